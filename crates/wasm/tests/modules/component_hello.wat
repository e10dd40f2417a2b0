;; A WASI preview 2 command component: prints "hello\n" through wasi:cli/stdout and returns
;; `ok` from wasi:cli/run (exit 0), or `err` (exit 1) if the write failed.
(component $C
  (import "wasi:io/error@0.2.0" (instance $error
    (export "error" (type (sub resource)))))
  (alias export $error "error" (type $error-t))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $error-t (type $e))
    (export "error" (type $e2 (eq $e)))
    (type $se (variant (case "last-operation-failed" (own $e2)) (case "closed")))
    (export "stream-error" (type $se2 (eq $se)))
    (export "output-stream" (type $os (sub resource)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8))
        (result (result (error $se2)))))))
  (alias export $streams "output-stream" (type $os-t))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer $C $os-t (type $os))
    (export "output-stream" (type $os2 (eq $os)))
    (export "get-stdout" (func (result (own $os2))))))

  (core module $Memory (memory (export "memory") 1))
  (core instance $memory (instantiate $Memory))
  (alias core export $memory "memory" (core memory $mem))
  (core func $get-stdout (canon lower (func $stdout "get-stdout")))
  (core func $write
    (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
      (memory $mem)))
  (core func $drop (canon resource.drop $os-t))

  (core module $Main
    (import "host" "memory" (memory 1))
    (import "host" "get-stdout" (func $get-stdout (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "drop" (func $drop (param i32)))
    (data (i32.const 16) "hello\n")
    (func (export "run") (result i32)
      (local $out i32)
      (local.set $out (call $get-stdout))
      ;; The result<_, stream-error> goes to offset 32; its first byte is 0 for ok.
      (call $write (local.get $out) (i32.const 16) (i32.const 6) (i32.const 32))
      (call $drop (local.get $out))
      (i32.ne (i32.load8_u (i32.const 32)) (i32.const 0))))
  (core instance $main (instantiate $Main
    (with "host" (instance
      (export "memory" (memory $mem))
      (export "get-stdout" (func $get-stdout))
      (export "write" (func $write))
      (export "drop" (func $drop))))))

  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance)))

;; Tries to reach host files that were not mapped. Exits 0 when every attempt fails, else
;; 10 + the attempt's number after printing what it read.
;;   1: "../secret.txt" relative to the preopened directory (fd 3)
;;   2: "/secret.txt" (absolute) relative to fd 3
;;   3: "secret.txt" relative to fd 4, which is not a preopen
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "../secret.txt")
  (data (i32.const 96) "/secret.txt")
  (data (i32.const 128) "secret.txt")
  (func $try (param $dir i32) (param $path i32) (param $len i32) (param $n i32)
    (if (i32.eqz (call $path_open (local.get $dir) (i32.const 0) (local.get $path)
          (local.get $len) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0)
          (i32.const 16)))
      (then (call $proc_exit (i32.add (i32.const 10) (local.get $n))))))
  (func (export "_start")
    (call $try (i32.const 3) (i32.const 64) (i32.const 13) (i32.const 1))
    (call $try (i32.const 3) (i32.const 96) (i32.const 11) (i32.const 2))
    (call $try (i32.const 4) (i32.const 128) (i32.const 10) (i32.const 3))))

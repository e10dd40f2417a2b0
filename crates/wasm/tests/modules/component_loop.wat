;; A WASI preview 2 command component that spins forever (timeouts, stop), or, with memory
;; growth, traps at its memory limit: `run` first grows memory by 64 KiB pages until
;; `memory.grow` fails, then loops.
(component
  (core module $Main
    (memory 1)
    (func (export "run") (result i32)
      (block $full
        (loop $grow
          (br_if $full (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
          (br_if $full (i32.ge_u (memory.size) (i32.const 1024)))
          (br $grow)))
      (loop $spin (br $spin))
      (i32.const 0)))
  (core instance $main (instantiate $Main))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance)))

;; Grows memory one 64 KiB page at a time, forever. If a growth is refused without a trap
;; (memory.grow returns -1), exits with code 99.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
        (then (call $proc_exit (i32.const 99))))
      (br $more))))

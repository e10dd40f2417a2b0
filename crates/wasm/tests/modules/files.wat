;; Expects one preopened directory (fd 3) holding input.txt.
;; 1. Reads input.txt and copies it to stdout.
;; 2. Opens input.txt for writing with O_TRUNC: if that fails, exits 40 (the expected end
;;    for a read-only mount); if it opens but the write fails, exits 42; if the write
;;    succeeds, exits 41.
;; Any failure in step 1 exits 30.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "input.txt")
  (data (i32.const 80) "X")
  (func (export "_start")
    (local $fd i32)
    ;; path_open(dirfd 3, lookup 0, "input.txt", oflags 0, rights FD_READ (2), 0, 0, &fd @ 16)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 9)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 30))))
    (local.set $fd (i32.load (i32.const 16)))
    ;; read up to 1024 bytes into 1024
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1024))
    (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (call $proc_exit (i32.const 30))))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; path_open(3, 0, "input.txt", O_TRUNC (8), rights FD_WRITE (64), 0, 0, &fd)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 9)
          (i32.const 8) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 40))))
    (i32.store (i32.const 0) (i32.const 80))
    (i32.store (i32.const 4) (i32.const 1))
    (if (call $fd_write (i32.load (i32.const 16)) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (call $proc_exit (i32.const 42))))
    (call $proc_exit (i32.const 41))))

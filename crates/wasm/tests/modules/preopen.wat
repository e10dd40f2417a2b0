;; Reports what was preopened at fd 3: "preopen <guest path>" or "no preopen"; then tries to
;; open input.txt there for reading: "open ok" or "open failed". Exits 0.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name"
    (func $prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "preopen ")
  (data (i32.const 120) "no preopen\n")
  (data (i32.const 140) "open ok\n")
  (data (i32.const 160) "open failed\n")
  (data (i32.const 180) "\n")
  (data (i32.const 200) "input.txt")
  ;; iovec at 0, bytes written at 8
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    ;; prestat at 16: tag (u8), then the name's length (u32) at 20
    (if (call $prestat_get (i32.const 3) (i32.const 16))
      (then (call $print (i32.const 120) (i32.const 11)))
      (else
        (call $print (i32.const 100) (i32.const 8))
        (drop (call $prestat_dir_name (i32.const 3) (i32.const 300) (i32.load (i32.const 20))))
        (call $print (i32.const 300) (i32.load (i32.const 20)))
        (call $print (i32.const 180) (i32.const 1))))
    ;; path_open(dirfd 3, lookup 0, "input.txt", oflags 0, rights FD_READ, 0, 0, &fd @ 24)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 9)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 24))
      (then (call $print (i32.const 160) (i32.const 12)))
      (else (call $print (i32.const 140) (i32.const 8))))))

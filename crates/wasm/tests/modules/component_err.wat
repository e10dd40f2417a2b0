;; A WASI preview 2 command component whose wasi:cli/run returns `err`: exit code 1.
(component
  (core module $Main
    (func (export "run") (result i32) (i32.const 1)))
  (core instance $main (instantiate $Main))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.12" (instance $run-instance)))

//! Sandbox log files, in the CRI log format containerd and the kubelet use:
//! `2016-10-06T00:17:09.669794202Z stdout F the line`. (Written by the wasm backend helper.)

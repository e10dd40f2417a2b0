//! containerd's snapshot on the bundle's rootfs, for linux tasks: mounted as runc's shim
//! mounts it, unmounted at delete.

use std::path::Path;

use containerd_shim::protos::api;
use containerd_shim::protos::ttrpc::Code;

use crate::task::{TtrpcResult, err};

/// Mounts containerd's snapshot (usually one overlay) on the bundle's rootfs, as runc's shim
/// does; what was mounted is undone when a later mount fails.
pub async fn mount_rootfs(mounts: &[api::Mount], root: &Path) -> TtrpcResult<()> {
    let mounts: Vec<(String, String, Vec<String>)> = mounts
        .iter()
        .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
        .collect();
    let root = root.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
        std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        for (typ, source, options) in &mounts {
            if let Err(e) =
                containerd_shim::mount::mount_rootfs(Some(typ), Some(source), options, &root)
            {
                let _ = containerd_shim::mount::umount_recursive(root.to_str(), libc::MNT_DETACH);
                return Err(format!(
                    "rootfs: mount {typ} {source} on {}: {e}",
                    root.display()
                ));
            }
        }
        Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(err(Code::INTERNAL, e)),
        Err(e) => Err(err(Code::INTERNAL, format!("rootfs: mount task: {e}"))),
    }
}

pub async fn unmount_rootfs(root: &Path) -> TtrpcResult<()> {
    let target = root.display().to_string();
    let result = tokio::task::spawn_blocking(move || {
        // Detached: a mount still busy (a process not yet reaped) goes once free.
        containerd_shim::mount::umount_recursive(Some(&target), libc::MNT_DETACH)
            .map_err(|e| format!("rootfs: unmount {target}: {e}"))
    })
    .await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(err(Code::INTERNAL, e)),
        Err(e) => Err(err(Code::INTERNAL, format!("rootfs: unmount task: {e}"))),
    }
}

//! Threads of their own, each with a current-thread runtime, for work that
//! must not share the threads serving requests: the writer (fsyncs and lock
//! waits), the exporter (Parquet encoding) and the WAL checkpointer.

use std::future::Future;

use tokio::runtime::Handle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Requests wait on it (the writer).
    Normal,
    /// Nobody waits on it: it yields the CPU to everything else. On two busy
    /// cores an export cycle's burst of Parquet encoding otherwise added 4-6 ms
    /// to the p99 of every write workload.
    Background,
}

/// Starts `task` on a new thread named `name`; it gets the thread's runtime handle.
pub fn spawn<F, Fut>(name: &str, priority: Priority, task: F) -> std::io::Result<()>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = name.to_string();
    std::thread::Builder::new().name(thread.clone()).spawn(move || {
        if priority == Priority::Background {
            lower_priority(&thread);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|err| panic!("a current-thread runtime for {thread}: {err}"));
        runtime.block_on(task(runtime.handle().clone()));
    })?;
    Ok(())
}

/// Raises the calling thread's nice value to 10 (lowering it needs privileges,
/// raising it does not). On Linux the nice value is per thread, and threads it
/// starts inherit it. Elsewhere the thread keeps the process's priority.
fn lower_priority(thread: &str) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
        if result != 0 {
            tracing::debug!(thread, error = %std::io::Error::last_os_error(), "cannot lower the thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = thread;
}

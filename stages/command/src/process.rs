//! Starting the program in a process group of its own, and stopping that whole group:
//! on cancellation (Ctrl-C, another stage failing, the scheduler's end), on the timeout,
//! and after the program ends (nothing it started is left behind).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a stopped program has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// Starts `cmd` as the leader of a new process group. On Linux it also dies with the thread
/// that started it (if huse-run itself is killed, the program does not run on).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `signal` to every process of the group `pgid`.
fn signal_group(pgid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

/// Stops the program's whole group: SIGTERM, up to [`GRACE`] to exit, then SIGKILL.
/// Returns the program's exit status.
pub fn stop(child: &mut Child) -> std::io::Result<ExitStatus> {
    let pgid = child.id();
    signal_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + GRACE;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            signal_group(pgid, libc::SIGKILL);
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    signal_group(pgid, libc::SIGKILL);
    Ok(status)
}

/// After the program ended by itself: kills whatever it started and left running.
pub fn sweep(child: &Child) {
    signal_group(child.id(), libc::SIGKILL);
}

//! An operator process under test (keyhaven or ESO): started with its log in a file,
//! waited for, stopped, and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The operator process, killed when dropped.
pub struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    /// Starts `command` (the binary `bin`) with stdout and stderr to `log`, stdin closed.
    pub fn spawn(mut command: Command, bin: &Path, log: PathBuf) -> anyhow::Result<Operator> {
        let file = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {}: {e}", bin.display()))?;
        Ok(Operator { child, log })
    }

    /// Polls `check` every `every` until it gives a value. Fails when the process exits
    /// (`name` exited, with its log) or, after `timeout`, with the last reason `check` gave.
    pub async fn wait_for<T>(
        &mut self,
        name: &str,
        timeout: Duration,
        every: Duration,
        mut check: impl AsyncFnMut(&Operator) -> anyhow::Result<Result<T, String>>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!(
                    "{name} exited ({status}); its log {}:\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            match check(self).await? {
                Ok(v) => return Ok(v),
                Err(why) => anyhow::ensure!(start.elapsed() < timeout, "{why}"),
            }
            tokio::time::sleep(every).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

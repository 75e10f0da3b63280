//! The audit stream's writer: one thread that owns the chain. Records wait in a queue; the
//! thread writes every queued record at once, syncs the file, then answers each waiter
//! (group commit: one fsync for many records). The file is opened for each batch, so a log
//! made unwritable (replaced, its directory gone, its disk full) is noticed at the next
//! record; records that could not be written are kept, in order, and written first once it
//! can be again.

use super::chain::{self, AuditKey, ChainState};
use super::{AuditError, Record};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Where the audit stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard output (the logs go to standard error).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl Target {
    /// `-` is standard output; anything else a file path.
    pub fn parse(text: &str) -> Target {
        match text {
            "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("standard output"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

type Reply = oneshot::Sender<Result<(), AuditError>>;

enum Request {
    Write(Vec<Record>, Option<Reply>),
    Probe(Reply),
}

pub(super) struct Writer {
    tx: mpsc::Sender<Request>,
    available: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

/// The most records kept while the stream cannot be written (beyond it, the oldest are
/// dropped and the chain shows the gap).
const MAX_PENDING: usize = 100_000;
/// How much of an existing file's end is read to continue its chain.
const TAIL: u64 = 256 * 1024;

impl Writer {
    pub(super) fn start(target: Target, key: AuditKey) -> Writer {
        let (tx, rx) = mpsc::channel();
        let available = Arc::new(AtomicBool::new(true));
        let written = Arc::new(AtomicU64::new(0));
        let mut state = State {
            target,
            key,
            chain: None,
            lock: None,
            torn: false,
            pending: Vec::new(),
            available: available.clone(),
            written: written.clone(),
        };
        std::thread::Builder::new()
            .name("keyhaven-audit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    state.serve(batch);
                }
            })
            .expect("spawn the audit writer thread");
        Writer {
            tx,
            available,
            written,
        }
    }

    pub(super) async fn write(&self, records: Vec<Record>) -> Result<(), AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write(records, Some(reply)))?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    pub(super) fn submit(&self, records: Vec<Record>) {
        let _ = self.send(Request::Write(records, None));
    }

    pub(super) async fn probe(&self) -> Result<(), AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Probe(reply))?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    pub(super) fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn send(&self, request: Request) -> Result<(), AuditError> {
        self.tx.send(request).map_err(|_| gone())
    }
}

fn gone() -> AuditError {
    AuditError("the audit writer stopped".into())
}

struct State {
    target: Target,
    key: AuditKey,
    /// Where the chain stands (None: not yet read from the file).
    chain: Option<ChainState>,
    /// Held open, locked, for the process's life: one writer per file.
    lock: Option<File>,
    /// The file ends in a partial line (a crash mid-write): the next write starts a new one.
    torn: bool,
    pending: Vec<Record>,
    available: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

impl State {
    fn serve(&mut self, batch: Vec<Request>) {
        let mut replies = Vec::new();
        for request in batch {
            match request {
                Request::Write(records, reply) => {
                    self.pending.extend(records);
                    replies.extend(reply);
                }
                Request::Probe(reply) => replies.push(reply),
            }
        }
        if self.pending.len() > MAX_PENDING {
            let excess = self.pending.len() - MAX_PENDING;
            warn!(
                dropped = excess,
                "audit records dropped: the audit log could not be written for too long"
            );
            self.pending.drain(..excess);
        }
        let result = self.flush();
        let was = self.available.swap(result.is_ok(), Ordering::Relaxed);
        match (&result, was) {
            (Err(e), true) => {
                warn!(error = %e, "audit log unavailable: no values are written until it is")
            }
            (Ok(()), false) => info!(target = %self.target, "audit log writable again"),
            _ => {}
        }
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }

    /// Writes the pending records (or, with none, checks the stream can be written).
    fn flush(&mut self) -> Result<(), AuditError> {
        let chain = self.chain()?;
        if self.pending.is_empty() {
            return match &self.target {
                Target::Stdout => Ok(()),
                Target::File(path) => open_append(path).map(drop),
            };
        }
        let mut text = String::new();
        if self.torn {
            text.push('\n');
        }
        let mut state = chain;
        for record in &self.pending {
            let (line, next) = chain::seal(&self.key, &state, record);
            text.push_str(&line);
            state = next;
        }
        match &self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())
                    .and_then(|()| out.flush())
                    .map_err(|e| AuditError(format!("standard output: {e}")))?;
            }
            Target::File(path) => {
                let mut file = open_append(path)?;
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_data())
                    .map_err(|e| AuditError(format!("{}: {e}", path.display())))?;
            }
        }
        self.torn = false;
        self.written
            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
        self.pending.clear();
        self.chain = Some(state.clone());
        Ok(())
    }

    /// The chain to continue: the file's last record's (read once), locked for this process.
    fn chain(&mut self) -> Result<ChainState, AuditError> {
        if let Some(chain) = &self.chain {
            return Ok(chain.clone());
        }
        let chain = match &self.target {
            Target::Stdout => ChainState::default(),
            Target::File(path) => {
                let mut file = open_append(path)?;
                let named = |e: std::io::Error| AuditError(format!("{}: {e}", path.display()));
                match file.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(AuditError(format!(
                            "{}: another process writes this audit log",
                            path.display()
                        )));
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(named(e)),
                }
                let (chain, torn) = tail_state(&mut file).map_err(named)?;
                self.torn = torn;
                self.lock = Some(file);
                if chain.seq > 0 {
                    info!(target = %self.target, seq = chain.seq, "audit log continued");
                }
                chain
            }
        };
        self.chain = Some(chain.clone());
        Ok(chain)
    }
}

fn open_append(path: &std::path::Path) -> Result<File, AuditError> {
    let mut options = OpenOptions::new();
    options.append(true).create(true).read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| AuditError(format!("{}: {e}", path.display())))
}

/// The chain state of a file's last record, and whether the file ends mid-line.
fn tail_state(file: &mut File) -> std::io::Result<(ChainState, bool)> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    let torn = !text.is_empty() && !text.ends_with('\n');
    let chain = text
        .split('\n')
        .rev()
        .find_map(chain::state_of)
        .unwrap_or_default();
    Ok((chain, torn))
}

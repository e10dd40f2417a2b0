//! Sandbox log files, in the CRI log format containerd and the kubelet use:
//! `2016-10-06T00:17:09.669794202Z stdout F the line`.
//!
//! One record per line: an RFC 3339 timestamp (UTC, nanoseconds), the stream, a tag (`F` for
//! a full line, `P` for a piece of a longer one) and the bytes the workload wrote, without
//! their `\n`. A line longer than [`MAX_RECORD_CONTENT`] is cut into `P` records ending with an
//! `F` one, so a reader never holds more than that per record and a workload that never writes
//! `\n` still shows up.
//!
//! Content is untrusted and written as it came (invalid UTF-8, escape sequences): whoever
//! prints it sanitizes it. The one guarantee is structural: a `\n` never appears inside a
//! record, so a workload cannot forge records.
//!
//! Files are read and followed with plain `std::fs` calls on the async worker: they are local,
//! each call is one short `read`, and tokio's `fs` would add a thread hand-off per call.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest content of one record; longer lines are split into `P` records (containerd uses
/// the same 16 KiB).
pub const MAX_RECORD_CONTENT: usize = 16 * 1024;

/// How often a [`LogFollower`] looks for new records.
pub const FOLLOW_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr: for per-stream state in a two-element array.
    pub fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed line of a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub time: SystemTime,
    pub stream: Stream,
    /// `P`: the line goes on in the next record of the same stream.
    pub partial: bool,
    /// The workload's bytes, untrusted, without the `\n`.
    pub content: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A line that is not a CRI log record; `value` is the offending part, cut to 64 bytes.
    #[error("log record {field} {value:?} {reason}")]
    Parse {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl LogError {
    /// The file is not there (a sandbox that has not written anything yet has no log).
    /// Callers test this rather than `path.exists()` after the fact: the file may appear
    /// between a failed read and the check.
    pub fn is_not_found(&self) -> bool {
        matches!(self, LogError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn parse_error(field: &'static str, value: &[u8], reason: &'static str) -> LogError {
    let cut = &value[..value.len().min(64)];
    LogError::Parse {
        field,
        value: String::from_utf8_lossy(cut).into_owned(),
        reason,
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> LogError {
    LogError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// Appends a workload's output to a log file as CRI records. Cheap to share (`&self` methods,
/// one mutex); each [`LogWriter::write`] is one `write` call, so a follower never sees half a
/// record except while that call runs (it waits for the `\n`).
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    inner: Mutex<WriterState>,
}

#[derive(Debug)]
struct WriterState {
    /// `None` until [`LogWriter::open`] for a [`LogWriter::deferred`] writer.
    file: Option<File>,
    /// Records written before the file was opened, in order.
    pending: Vec<u8>,
    /// The unfinished line of each stream, shorter than [`MAX_RECORD_CONTENT`].
    partial: [Vec<u8>; 2],
    /// Bytes in the file, including what was there when it was opened.
    written: u64,
    /// Most bytes the file may hold; later output is dropped (a guest must not fill the disk).
    limit: Option<u64>,
    /// The limit was reached and the notice written.
    full: bool,
    /// The workload ended ([`LogWriter::close`]): the file is not kept open, not even by an
    /// [`LogWriter::open`] that comes late, until [`LogWriter::begin`] starts a new run.
    closed: bool,
}

impl WriterState {
    /// Appends encoded records, unless that would pass the limit: then the records are
    /// dropped and, once, a notice on stderr says so.
    fn append(&mut self, path: &Path, out: &[u8]) -> Result<(), LogError> {
        if out.is_empty() || self.full {
            return Ok(());
        }
        let mut out = std::borrow::Cow::Borrowed(out);
        if let Some(limit) = self.limit
            && self.written + out.len() as u64 > limit
        {
            self.full = true;
            let notice = format!(
                "warren: the log reached its limit of {limit} bytes; later output is dropped"
            );
            let mut record = Vec::new();
            encode_record(
                &mut record,
                &format_timestamp(SystemTime::now()),
                Stream::Stderr,
                false,
                notice.as_bytes(),
            );
            out = std::borrow::Cow::Owned(record);
        }
        match &mut self.file {
            Some(file) => file
                .write_all(&out)
                .map_err(|e| io_error("write", path, e))?,
            None => self.pending.extend_from_slice(&out),
        }
        self.written += out.len() as u64;
        Ok(())
    }
}

impl LogWriter {
    /// Opens `path` for appending, creating it and its parent directories.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, LogError> {
        Self::with_limit(path, None)
    }

    /// Like [`LogWriter::create`], keeping the file at most `limit` bytes: output past it is
    /// dropped, and one last stderr record says so.
    pub fn with_limit(path: impl Into<PathBuf>, limit: Option<u64>) -> Result<Self, LogError> {
        let writer = Self::deferred(path, limit);
        writer.open()?;
        Ok(writer)
    }

    /// A writer that touches no file until [`LogWriter::open`]: records written before are
    /// kept in memory (timestamped when written, counted against `limit`) and written out
    /// by `open`. For a workload whose start must not wait for the disk: the file is made
    /// off that path, and readers wait for it (see `Backend::logs_settled`).
    pub fn deferred(path: impl Into<PathBuf>, limit: Option<u64>) -> Self {
        LogWriter {
            path: path.into(),
            inner: Mutex::new(WriterState {
                file: None,
                pending: Vec::new(),
                partial: [Vec::new(), Vec::new()],
                written: 0,
                limit,
                full: false,
                closed: false,
            }),
        }
    }

    /// A new run of the workload writes to the log again (after a [`LogWriter::close`]).
    pub fn begin(&self) {
        self.lock().closed = false;
    }

    /// Counts what the file already holds against the limit, for a deferred writer of a log
    /// that exists (a sandbox taken back after a restart) and may be written to before
    /// [`LogWriter::open`].
    pub fn count_existing(&self) {
        let existing = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let mut state = self.lock();
        if state.file.is_none() {
            state.written = existing + state.pending.len() as u64;
        }
    }

    /// Creates (or appends to) the file, making its directory if missing, and writes what
    /// was recorded before. Does nothing if it is open already.
    pub fn open(&self) -> Result<(), LogError> {
        let mut state = self.lock();
        if state.file.is_some() {
            return Ok(());
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| io_error("open", &self.path, e))?;
        let existing = file.metadata().map(|m| m.len()).unwrap_or(0);
        let pending = std::mem::take(&mut state.pending);
        if !pending.is_empty() {
            file.write_all(&pending)
                .map_err(|e| io_error("write", &self.path, e))?;
        }
        // What the file holds now: what was there and what waited. (What waited was counted
        // as written; a count carried over a close is the file's old length, so it is reset.)
        state.written = existing + pending.len() as u64;
        if !state.closed {
            state.file = Some(file);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // A panic while holding the lock leaves at worst a half-buffered line.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `bytes` written by the workload on `stream`: every completed line becomes an
    /// `F` record; the rest waits for its `\n` (or for [`LogWriter::close`]).
    pub fn write(&self, stream: Stream, bytes: &[u8]) -> Result<(), LogError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let stamp = format_timestamp(SystemTime::now());
        let mut state = self.lock();
        let state = &mut *state;
        let partial = &mut state.partial[stream.index()];
        let mut out = Vec::with_capacity(bytes.len() + 48);
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(nl);
            if partial.is_empty() {
                encode(&mut out, &stamp, stream, line);
            } else {
                partial.extend_from_slice(line);
                encode(&mut out, &stamp, stream, partial);
                partial.clear();
            }
            rest = &after[1..];
        }
        partial.extend_from_slice(rest);
        // Emit whole pieces of an over-long unfinished line now; keep the remainder.
        if partial.len() >= MAX_RECORD_CONTENT {
            let whole = partial.len() / MAX_RECORD_CONTENT * MAX_RECORD_CONTENT;
            for piece in partial[..whole].chunks(MAX_RECORD_CONTENT) {
                encode_record(&mut out, &stamp, stream, true, piece);
            }
            partial.drain(..whole);
        }
        state.append(&self.path, &out)
    }

    /// Writes the unfinished lines as `P` records and closes the file: the workload ended.
    /// `P`, not `F`: the output did not end with a newline, and a reader that adds one after
    /// every full record would change it (`run --wait -- cat < binary` gained a byte). As in
    /// `docker logs`, the next run's first line then continues it.
    /// A finished sandbox holds no descriptor (a server keeps many of them); one that runs
    /// again calls [`LogWriter::begin`], and its [`LogWriter::open`] appends.
    pub fn close(&self) -> Result<(), LogError> {
        let stamp = format_timestamp(SystemTime::now());
        let mut state = self.lock();
        let mut out = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let partial = &mut state.partial[stream.index()];
            if !partial.is_empty() {
                encode_record(&mut out, &stamp, stream, true, partial);
                partial.clear();
            }
        }
        let appended = state.append(&self.path, &out);
        state.closed = true;
        // `written` stays the file's length, so output before the next open (a new run's,
        // held in memory) is counted against the limit from there.
        state.file = None;
        appended
    }
}

/// Encodes one complete line, cut into `P` pieces ending with an `F` one when it is too long.
fn encode(out: &mut Vec<u8>, stamp: &str, stream: Stream, line: &[u8]) {
    if line.is_empty() {
        encode_record(out, stamp, stream, false, b"");
        return;
    }
    let mut pieces = line.chunks(MAX_RECORD_CONTENT).peekable();
    while let Some(piece) = pieces.next() {
        encode_record(out, stamp, stream, pieces.peek().is_some(), piece);
    }
}

fn encode_record(out: &mut Vec<u8>, stamp: &str, stream: Stream, partial: bool, content: &[u8]) {
    out.extend_from_slice(stamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Parses one record; a trailing `\n` is allowed. Never panics, whatever the bytes.
pub fn parse_line(line: &[u8]) -> Result<LogRecord, LogError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (stamp, rest) = split_field(line, "timestamp")?;
    let time = parse_timestamp(stamp)?;
    let (stream, rest) = split_field(rest, "stream")?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => return Err(parse_error("stream", other, "is not stdout or stderr")),
    };
    // The tag is the last field before the content, which may be empty (no space then).
    let (tag, content) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    // CRI allows further tags after a ':'; the first says full or partial.
    let partial = match tag.split(|&b| b == b':').next() {
        Some(b"F") => false,
        Some(b"P") => true,
        _ => return Err(parse_error("tag", tag, "is not F or P")),
    };
    if content.contains(&b'\n') {
        return Err(parse_error("content", content, "contains a newline"));
    }
    Ok(LogRecord {
        time,
        stream,
        partial,
        content: content.to_vec(),
    })
}

fn split_field<'a>(line: &'a [u8], field: &'static str) -> Result<(&'a [u8], &'a [u8]), LogError> {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => Ok((&line[..i], &line[i + 1..])),
        None => Err(parse_error(field, line, "is not followed by a space")),
    }
}

/// `2016-10-06T00:17:09.669794202Z`: UTC, always nine fraction digits.
pub fn format_timestamp(time: SystemTime) -> String {
    let nanos: i128 = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    let secs = nanos.div_euclid(1_000_000_000) as i64;
    let frac = nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:09}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Parses RFC 3339 (`Z` or `±HH:MM`, 0–9 fraction digits), as containerd writes it.
pub fn parse_timestamp(s: &[u8]) -> Result<SystemTime, LogError> {
    const WHAT: &str = "is not an RFC 3339 time (expected e.g. 2016-10-06T00:17:09.669794202Z)";
    let bad = || parse_error("timestamp", s, WHAT);
    let num = |range: std::ops::Range<usize>| -> Result<i64, LogError> {
        let digits = s.get(range).ok_or_else(bad)?;
        digits.iter().try_fold(0i64, |acc, &b| {
            if b.is_ascii_digit() {
                Ok(acc * 10 + i64::from(b - b'0'))
            } else {
                Err(bad())
            }
        })
    };
    let sep = |i: usize, want: &[u8]| -> Result<(), LogError> {
        match s.get(i) {
            Some(b) if want.contains(b) => Ok(()),
            _ => Err(bad()),
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let mut i = 19;
    let mut nanos = 0i64;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
        nanos = num(start..i)? * 10i64.pow(9 - digits as u32);
    }
    let offset = match s.get(i..) {
        Some(b"Z" | b"z") => 0,
        Some(&[sign @ (b'+' | b'-'), _, _, b':', _, _]) => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let off = h * 3600 + m * 60;
            if sign == b'+' { off } else { -off }
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos as u32))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(nanos as u64)))
    };
    time.ok_or_else(bad)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The records of a log file: those at or after `since`, then the last `tail` of them.
/// Lines that do not parse (a write torn by a crash) are skipped.
pub fn read_logs(
    path: &Path,
    tail: Option<usize>,
    since: Option<SystemTime>,
) -> Result<Vec<LogRecord>, LogError> {
    read_logs_from(path, tail, since).map(|(records, _)| records)
}

/// Like [`read_logs`], plus the byte offset just past the last complete line, where a
/// [`LogFollower`] picks up (`logs --tail 10 --follow`).
pub fn read_logs_from(
    path: &Path,
    tail: Option<usize>,
    since: Option<SystemTime>,
) -> Result<(Vec<LogRecord>, u64), LogError> {
    let bytes = std::fs::read(path).map_err(|e| io_error("read", path, e))?;
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut records: Vec<LogRecord> = bytes[..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| parse_line(l).ok())
        .filter(|r| since.is_none_or(|since| r.time >= since))
        .collect();
    if let Some(n) = tail {
        keep_last_lines(&mut records, n);
    }
    Ok((records, end as u64))
}

/// Drops all but the records of the last `n` lines. A line is the records of one stream up
/// to one that is not partial (a long line is many records, maybe with the other stream's
/// between them), or up to the end of the log; lines count in the order they end.
fn keep_last_lines(records: &mut Vec<LogRecord>, n: usize) {
    // From the end: each stream's line that earlier partial records belong to.
    let mut open: [Option<usize>; 2] = [None; 2];
    let mut ended = 0;
    let keep: Vec<bool> = (0..records.len())
        .rev()
        .map(|i| {
            let stream = records[i].stream.index();
            let line = match open[stream] {
                Some(line) if records[i].partial => line,
                _ => {
                    ended += 1;
                    ended - 1
                }
            };
            open[stream] = Some(line);
            line < n
        })
        .collect();
    let mut keep = keep.into_iter().rev();
    records.retain(|_| keep.next().unwrap_or(false));
}

/// Follows a log file as it grows, polling every [`FOLLOW_POLL`], until `done` turns true (or
/// its sender is dropped) and everything written before that has been returned.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    file: Option<File>,
    /// Offset of the first byte not yet read.
    read_offset: u64,
    /// Bytes read but not yet ending in `\n`.
    buf: Vec<u8>,
    pending: VecDeque<LogRecord>,
    done: tokio::sync::watch::Receiver<bool>,
    /// The `done` sender is gone: treated as done.
    closed: bool,
}

impl LogFollower {
    /// Starts at byte `from_offset` (0, or what [`read_logs_from`] returned). The file may not
    /// exist yet.
    pub fn new(
        path: impl Into<PathBuf>,
        from_offset: u64,
        done: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        LogFollower {
            path: path.into(),
            file: None,
            read_offset: from_offset,
            buf: Vec::new(),
            pending: VecDeque::new(),
            done,
            closed: false,
        }
    }

    /// The next record; `Ok(None)` once the sandbox ended and the file is drained.
    pub async fn next(&mut self) -> Result<Option<LogRecord>, LogError> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Ok(Some(record));
            }
            // Read `done` before reading the file: if it was set, this read sees all output.
            let done = self.closed || *self.done.borrow_and_update();
            self.read_more()?;
            if !self.pending.is_empty() {
                continue;
            }
            if done {
                return Ok(None);
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                changed = self.done.changed() => self.closed = changed.is_err(),
            }
        }
    }

    fn read_more(&mut self) -> Result<(), LogError> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(self.read_offset))
                        .map_err(|e| io_error("seek", &self.path, e))?;
                    self.file = Some(file);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error("open", &self.path, e)),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let start = self.buf.len();
        let n = file
            .read_to_end(&mut self.buf)
            .map_err(|e| io_error("read", &self.path, e))?;
        self.read_offset += n as u64;
        let Some(end) = self.buf[start..].iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let end = start + end + 1;
        for line in self.buf[..end].split(|&b| b == b'\n') {
            if let Ok(record) = parse_line(line) {
                self.pending.push_back(record);
            }
        }
        self.buf.drain(..end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<LogRecord> {
        read_logs(path, None, None).expect("read logs")
    }

    fn contents(records: &[LogRecord]) -> Vec<(Stream, bool, Vec<u8>)> {
        records
            .iter()
            .map(|r| (r.stream, r.partial, r.content.clone()))
            .collect()
    }

    #[test]
    fn a_deferred_log_keeps_records_until_opened_then_writes_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sandbox/output.log");
        let w = LogWriter::deferred(&path, Some(400));
        let before = SystemTime::now();
        w.write(Stream::Stdout, b"first\nsec").expect("write");
        w.write(Stream::Stderr, b"oops\n").expect("write");
        let written = SystemTime::now();
        assert!(
            !path.exists() && !path.parent().expect("parent").exists(),
            "no I/O yet"
        );
        std::thread::sleep(Duration::from_millis(20));
        w.open().expect("open");
        w.open().expect("a second open does nothing");
        w.write(Stream::Stdout, b"ond\n").expect("write");
        let got = records(&path);
        assert_eq!(
            contents(&got),
            vec![
                (Stream::Stdout, false, b"first".to_vec()),
                (Stream::Stderr, false, b"oops".to_vec()),
                (Stream::Stdout, false, b"second".to_vec()),
            ]
        );
        assert!(
            got[0].time >= before && got[0].time <= written,
            "records keep the time they were written, not the time of the open (20 ms later)"
        );
        // The limit counts what was held in memory too.
        w.write(Stream::Stdout, &[b'x'; 300]).expect("write");
        w.write(Stream::Stdout, b"\n").expect("write");
        let last = records(&path).pop().expect("records");
        assert!(String::from_utf8_lossy(&last.content).contains("limit of 400 bytes"));
    }

    /// Descriptors of this process open on `path`.
    fn open_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            .count()
    }

    #[test]
    fn a_closed_log_holds_no_descriptor_until_a_new_run_begins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::with_limit(&path, Some(100)).expect("create");
        w.write(Stream::Stdout, b"one\ntw").expect("write");
        assert_eq!(open_on(&path), 1);
        w.close().expect("close");
        assert_eq!(open_on(&path), 0, "a finished workload's log is closed");
        // An open that comes after the end (the file job lost the race with a short run)
        // writes what waited and does not keep the file either.
        let late = dir.path().join("late.log");
        let l = LogWriter::deferred(&late, None);
        l.write(Stream::Stdout, b"quick\n").expect("write");
        l.close().expect("close");
        l.open().expect("open");
        assert_eq!(open_on(&late), 0);
        assert_eq!(records(&late).len(), 1);
        // A new run appends, and the limit counts the whole file.
        w.begin();
        w.open().expect("reopen");
        assert_eq!(open_on(&path), 1);
        w.write(Stream::Stdout, &[b'x'; 60]).expect("write");
        w.write(Stream::Stdout, b"\n").expect("write");
        w.close().expect("close");
        let got = records(&path);
        assert_eq!(
            contents(&got)[..2],
            [
                (Stream::Stdout, false, b"one".to_vec()),
                // Unfinished at the close: partial, as the bytes were.
                (Stream::Stdout, true, b"tw".to_vec())
            ]
        );
        assert!(
            String::from_utf8_lossy(&got.last().expect("records").content)
                .contains("limit of 100 bytes"),
            "{got:?}"
        );
        assert_eq!(open_on(&path), 0);
    }

    #[test]
    fn a_new_run_before_its_file_opens_is_held_to_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::deferred(&path, Some(300));
        w.write(Stream::Stdout, &[b'a'; 100]).expect("write");
        w.write(Stream::Stdout, b"\n").expect("write");
        // The run ends before its file job opened the file; the late open writes it out.
        w.close().expect("close");
        w.open().expect("late open");
        let first = std::fs::metadata(&path).expect("log").len();
        assert!(first > 100, "{first}");
        // The next run writes before its open: counted from the file's length.
        w.begin();
        for _ in 0..5 {
            w.write(Stream::Stdout, &[b'b'; 100]).expect("write");
            w.write(Stream::Stdout, b"\n").expect("write");
        }
        w.open().expect("open");
        w.close().expect("close");
        let got = records(&path);
        assert!(
            String::from_utf8_lossy(&got.last().expect("records").content)
                .contains("limit of 300 bytes"),
            "{got:?}"
        );
        let len = std::fs::metadata(&path).expect("log").len();
        assert!(
            len <= 300 + 200,
            "{len} bytes: the limit held (plus its notice)"
        );
        // A writer for a log that exists counts it before its open.
        let again = LogWriter::deferred(&path, Some(300));
        again.count_existing();
        again.write(Stream::Stdout, b"more\n").expect("write");
        again.open().expect("open");
        let got = records(&path);
        assert!(
            !got.iter().any(|r| r.content == b"more"),
            "full already: {got:?}"
        );
    }

    #[test]
    fn a_full_log_drops_later_output_with_one_notice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::with_limit(&path, Some(1000)).expect("create");
        for i in 0..100 {
            w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                .expect("write");
        }
        w.close().expect("close");
        let size = std::fs::metadata(&path).expect("stat").len();
        assert!(size < 1000 + 200, "the file stays near its limit: {size}");
        let got = records(&path);
        let last = got.last().expect("records");
        assert_eq!(last.stream, Stream::Stderr);
        assert!(String::from_utf8_lossy(&last.content).contains("limit of 1000 bytes"));
        assert_eq!(
            got.iter().filter(|r| r.stream == Stream::Stderr).count(),
            1,
            "one notice"
        );
        assert!(
            got.len() > 5 && got[0].content == b"line 0",
            "output up to the limit is kept"
        );
        // Reopening counts what the file already holds.
        let again = LogWriter::with_limit(&path, Some(1000)).expect("reopen");
        again.write(Stream::Stdout, b"more\n").expect("write");
        assert_eq!(
            records(&path).len(),
            got.len() + 1,
            "only the notice again, no more output"
        );
    }

    #[test]
    fn round_trip_lines_and_partials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/output.log");
        let w = LogWriter::create(&path).expect("create");
        w.write(Stream::Stdout, b"hel").expect("write");
        w.write(Stream::Stderr, b"oops\n").expect("write");
        w.write(Stream::Stdout, b"lo\n\nworld").expect("write");
        w.close().expect("close");
        w.close().expect("close twice");
        let got = contents(&records(&path));
        assert_eq!(
            got,
            vec![
                (Stream::Stderr, false, b"oops".to_vec()),
                (Stream::Stdout, false, b"hello".to_vec()),
                (Stream::Stdout, false, b"".to_vec()),
                (Stream::Stdout, true, b"world".to_vec()),
            ]
        );
        let text = std::fs::read_to_string(&path).expect("read");
        let first = text.lines().next().expect("a line");
        assert!(first.ends_with("Z stderr F oops"), "{first}");
        assert_eq!(
            first.len(),
            "2016-10-06T00:17:09.669794202Z stderr F oops".len()
        );
    }

    #[test]
    fn long_lines_are_cut_into_partial_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::create(&path).expect("create");
        // An unfinished line past the limit is flushed as P without waiting for its end.
        let long = vec![b'x'; MAX_RECORD_CONTENT + 10];
        w.write(Stream::Stdout, &long).expect("write");
        let got = records(&path);
        assert_eq!(got.len(), 1);
        assert!(got[0].partial);
        assert_eq!(got[0].content.len(), MAX_RECORD_CONTENT);
        w.write(Stream::Stdout, b"y\n").expect("write");
        // A complete line twice the limit: P, P, F(empty is not emitted: exact multiple ends in F).
        let double = vec![b'z'; 2 * MAX_RECORD_CONTENT];
        let mut with_nl = double.clone();
        with_nl.push(b'\n');
        w.write(Stream::Stderr, &with_nl).expect("write");
        let got = records(&path);
        let shape: Vec<(Stream, bool, usize)> = got
            .iter()
            .map(|r| (r.stream, r.partial, r.content.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Stream::Stdout, true, MAX_RECORD_CONTENT),
                (Stream::Stdout, false, 11),
                (Stream::Stderr, true, MAX_RECORD_CONTENT),
                (Stream::Stderr, false, MAX_RECORD_CONTENT),
            ]
        );
        // Joining the pieces gives back the lines.
        let mut joined = Vec::new();
        for r in got.iter().filter(|r| r.stream == Stream::Stderr) {
            joined.extend_from_slice(&r.content);
        }
        assert_eq!(joined, double);
    }

    #[test]
    fn binary_content_is_kept_byte_for_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::create(&path).expect("create");
        let bytes: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n').collect();
        let mut line = bytes.clone();
        line.push(b'\n');
        w.write(Stream::Stdout, &line).expect("write");
        w.write(Stream::Stdout, b"\xff\xfe trailing")
            .expect("write");
        w.close().expect("close");
        let got = records(&path);
        assert_eq!(got[0].content, bytes);
        assert_eq!(got[1].content, b"\xff\xfe trailing");
        // No newline ended it: none is made up (a reader adds one after full records only).
        assert!(got[1].partial);
    }

    #[test]
    fn tail_and_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::create(&path).expect("create");
        w.write(Stream::Stdout, b"1\n2\n").expect("write");
        std::thread::sleep(Duration::from_millis(5));
        let middle = SystemTime::now();
        std::thread::sleep(Duration::from_millis(5));
        w.write(Stream::Stdout, b"3\n4\n5\n").expect("write");
        let text =
            |rs: Vec<LogRecord>| -> Vec<Vec<u8>> { rs.into_iter().map(|r| r.content).collect() };
        let all = read_logs(&path, None, None).expect("read");
        assert_eq!(all.len(), 5);
        assert_eq!(
            text(read_logs(&path, Some(2), None).expect("read")),
            [b"4", b"5"]
        );
        assert_eq!(read_logs(&path, Some(0), None).expect("read"), []);
        assert_eq!(read_logs(&path, Some(99), None).expect("read").len(), 5);
        // A line longer than one record counts once, and a partial line at the end too.
        let long = dir.path().join("long.log");
        let w = LogWriter::create(&long).expect("create");
        let big = vec![b'x'; 3 * MAX_RECORD_CONTENT + 5];
        w.write(Stream::Stdout, b"a\n").expect("write");
        w.write(Stream::Stdout, &big).expect("write");
        w.write(Stream::Stderr, b"e\n").expect("write");
        w.write(Stream::Stdout, b"\nend").expect("write");
        w.close().expect("close");
        let lines = |rs: Vec<LogRecord>| -> Vec<(Stream, usize)> {
            let mut out: Vec<(Stream, usize)> = Vec::new();
            let mut open = [false; 2];
            for r in rs {
                let s = r.stream as usize;
                match out.iter_mut().rev().find(|l| l.0 == r.stream) {
                    Some(l) if open[s] => l.1 += r.content.len(),
                    _ => out.push((r.stream, r.content.len())),
                }
                open[s] = r.partial;
            }
            out
        };
        // Lines in the order they end: a, e, the long one, end.
        let (a, e, long_line, end) = (
            (Stream::Stdout, 1),
            (Stream::Stderr, 1),
            (Stream::Stdout, big.len()),
            (Stream::Stdout, 3),
        );
        let wants: [&[(Stream, usize)]; 5] = [
            &[],
            &[end],
            &[long_line, end],
            &[long_line, e, end],
            &[a, long_line, e, end],
        ];
        for (n, want) in wants.iter().enumerate() {
            let got = lines(read_logs(&long, Some(n), None).expect("read"));
            assert_eq!(got, *want, "--tail {n}");
        }
        assert_eq!(
            text(read_logs(&path, None, Some(middle)).expect("read")),
            [b"3", b"4", b"5"]
        );
        assert_eq!(
            text(read_logs(&path, Some(1), Some(middle)).expect("read")),
            [b"5"]
        );
        // The offset is the end of the last complete line; a torn line is skipped.
        let len = std::fs::metadata(&path).expect("stat").len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"garbage\n2016-10-06T00:17:09Z stdout F torn"))
            .expect("append");
        let (rs, offset) = read_logs_from(&path, None, None).expect("read");
        assert_eq!(rs.len(), 5);
        assert_eq!(offset, len + "garbage\n".len() as u64);
        let missing = read_logs(&dir.path().join("nope.log"), None, None).unwrap_err();
        assert!(missing.to_string().contains("nope.log"), "{missing}");
    }

    #[test]
    fn parses_containerd_lines() {
        let r = parse_line(b"2016-10-06T00:17:09.669794202Z stdout F the line\n").expect("parse");
        assert_eq!(r.stream, Stream::Stdout);
        assert!(!r.partial);
        assert_eq!(r.content, b"the line");
        assert_eq!(
            r.time,
            UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202)
        );
        // Go's RFC3339Nano drops trailing zeros and may use a local offset.
        let r = parse_line(b"2016-10-06T02:17:09.5+02:00 stderr P:x  two spaces").expect("parse");
        assert_eq!(
            r.time,
            UNIX_EPOCH + Duration::new(1_475_713_029, 500_000_000)
        );
        assert!(r.partial);
        assert_eq!(r.content, b" two spaces");
        let r = parse_line(b"1969-12-31T23:59:59.25Z stdout F").expect("parse");
        assert_eq!(r.content, b"");
        assert_eq!(format_timestamp(r.time), "1969-12-31T23:59:59.250000000Z");
        let leap = parse_timestamp(b"2024-02-29T12:00:00Z").expect("leap day");
        assert_eq!(format_timestamp(leap), "2024-02-29T12:00:00.000000000Z");
    }

    #[test]
    fn garbage_lines_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "timestamp"),
            (b"garbage", "timestamp"),
            (b"2016-10-06T00:17:09Z", "timestamp"),
            (b"2016-13-06T00:17:09Z stdout F x", "timestamp"),
            (b"2023-02-29T00:17:09Z stdout F x", "timestamp"),
            (b"2016-10-06T24:17:09Z stdout F x", "timestamp"),
            (b"2016-10-06T00:17:09.Z stdout F x", "timestamp"),
            (b"2016-10-06T00:17:09.1234567890Z stdout F x", "timestamp"),
            (b"2016-10-06T00:17:09+2:00 stdout F x", "timestamp"),
            (b"\xff\xfe\xfd\xfc-10-06T00:17:09Z stdout F x", "timestamp"),
            (b"2016-10-06T00:17:09Z stdin F x", "stream"),
            (b"2016-10-06T00:17:09Z stdout", "stream"),
            (b"2016-10-06T00:17:09Z stdout X x", "tag"),
            (b"2016-10-06T00:17:09Z stdout  x", "tag"),
            (b"2016-10-06T00:17:09Z stdout F a\nb", "content"),
        ];
        for (line, field) in cases {
            match parse_line(line) {
                Err(LogError::Parse { field: f, .. }) => {
                    assert_eq!(f, *field, "{:?}", String::from_utf8_lossy(line))
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
        let msg = parse_line(b"yesterday stdout F x").unwrap_err().to_string();
        assert!(
            msg.contains("\"yesterday\"") && msg.contains("RFC 3339"),
            "{msg}"
        );
    }

    #[test]
    fn parser_never_panics_on_random_bytes() {
        // A cheap deterministic fuzz: mutations of a valid line and random junk.
        let valid = b"2016-10-06T00:17:09.669794202+01:30 stdout P:a content".to_vec();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut line = valid.clone();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % line.len();
                line[i] = next() as u8;
            }
            line.truncate((next() as usize) % (line.len() + 1));
            let _ = parse_line(&line);
        }
    }

    #[test]
    fn timestamps_round_trip() {
        for secs in [
            0u64,
            1,
            951_782_400,
            1_475_713_029,
            4_102_444_800,
            253_402_300_799,
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, 123_456_789);
            let s = format_timestamp(t);
            assert_eq!(parse_timestamp(s.as_bytes()).expect(&s), t, "{s}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follower_sees_appended_lines_and_stops_when_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        // Started before the file exists.
        let mut follower = LogFollower::new(&path, 0, done_rx);
        let writer_path = path.clone();
        let writer = tokio::spawn(async move {
            let w = LogWriter::create(&writer_path).expect("create");
            for i in 0..5 {
                w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            w.write(Stream::Stderr, b"last, unfinished").expect("write");
            w.close().expect("close");
            done_tx.send(true).expect("send");
        });
        let mut seen = Vec::new();
        let follow = async {
            while let Some(r) = follower.next().await.expect("next") {
                seen.push(String::from_utf8_lossy(&r.content).into_owned());
            }
        };
        tokio::time::timeout(Duration::from_secs(10), follow)
            .await
            .expect("the follower ends once done");
        writer.await.expect("writer");
        assert_eq!(
            seen,
            [
                "line 0",
                "line 1",
                "line 2",
                "line 3",
                "line 4",
                "last, unfinished"
            ]
        );
    }

    #[tokio::test]
    async fn follower_resumes_at_offset_and_ends_when_sender_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let w = LogWriter::create(&path).expect("create");
        w.write(Stream::Stdout, b"old 1\nold 2\n").expect("write");
        let (old, offset) = read_logs_from(&path, Some(1), None).expect("read");
        assert_eq!(old[0].content, b"old 2");
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let mut follower = LogFollower::new(&path, offset, done_rx);
        w.write(Stream::Stdout, b"new\n").expect("write");
        drop(done_tx);
        let r = follower.next().await.expect("next").expect("a record");
        assert_eq!(r.content, b"new");
        assert!(follower.next().await.expect("next").is_none());
    }

    #[test]
    fn a_missing_log_is_told_apart_from_an_unreadable_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = read_logs_from(&dir.path().join("none.log"), None, None)
            .expect_err("a missing file is an error");
        assert!(missing.is_not_found(), "{missing:?}");
        // A directory exists but cannot be read as a file: a real error, with its cause.
        let unreadable = read_logs_from(dir.path(), None, None).expect_err("a dir is not a log");
        assert!(!unreadable.is_not_found(), "{unreadable:?}");
        let chain = crate::error_chain(&unreadable);
        assert!(chain.contains("directory"), "the cause is printed: {chain}");
    }
}

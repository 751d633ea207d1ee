//! Commands: starting one, its output, its stdin and its end.

use std::io::{self, Read};
use std::sync::Arc;

use crate::protocol::{
    Credit, ExecRequest, ExitStatus, RequestBody, ResponseBody, CAP_PTY, MAX_CHUNK,
};

use super::{
    unexpected, AgentClient, ClientError, ExecOutput, Inner, OutputAcker, OutputStream, Registered,
    Result,
};

impl AgentClient {
    /// Starts a command and returns once it runs (or with the reason it could not start,
    /// e.g. [`crate::protocol::ErrorKind::NotFound`] for a missing program).
    pub fn spawn(&self, request: ExecRequest) -> Result<Execution> {
        self.start(RequestBody::Exec(request))
    }

    /// Starts a command on a new pseudo-terminal of `cols` x `rows` (its own session, the
    /// terminal its controlling terminal and its stdio). Its output (the terminal's) comes as
    /// [`OutputStream::Stdout`]; [`Execution::stdin`] types into it; [`resize`](Self::resize)
    /// changes its size. An agent without [`CAP_PTY`] gives [`ClientError::Unsupported`].
    pub fn spawn_pty(&self, request: ExecRequest, cols: u16, rows: u16) -> Result<Execution> {
        self.require(CAP_PTY, "run a command on a terminal")?;
        self.start(RequestBody::ExecPty {
            exec: request,
            cols,
            rows,
        })
    }

    /// Sets the window size of the terminal of the running [`spawn_pty`](Self::spawn_pty)
    /// command `exec_id` ([`Execution::id`]).
    pub fn resize(&self, exec_id: u64, cols: u16, rows: u16) -> Result<()> {
        self.require(CAP_PTY, "resize a terminal")?;
        let body = RequestBody::Resize {
            target: exec_id,
            cols,
            rows,
        };
        match self.call("resize", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("resize", &other)),
        }
    }

    fn start(&self, body: RequestBody) -> Result<Execution> {
        let stream = self.inner.register()?;
        let Registered { id, .. } = stream;
        if let Err(err) = self.inner.send(id, body) {
            self.inner.unregister(id);
            return Err(err);
        }
        match self.next_response("the start of a command", id, &stream.rx)? {
            ResponseBody::Started { pid } => Ok(Execution {
                inner: self.inner.clone(),
                pid,
                stream,
            }),
            ResponseBody::Error(err) => Err(ClientError::Remote(err)),
            other => {
                self.inner.unregister(id);
                Err(unexpected("exec", &other))
            }
        }
    }

    /// Runs a command, handing its output to `on_output` as it comes; each stream's chunks
    /// arrive in order. Stdin is `request.stdin` only (`stdin_stream` is ignored).
    pub fn exec(
        &self,
        mut request: ExecRequest,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus> {
        request.stdin_stream = false;
        self.spawn(request)?.wait(on_output)
    }

    /// Like [`exec`](Self::exec), with stdin streamed from `stdin` (after `request.stdin`)
    /// by a helper thread until its end.
    pub fn exec_with_stdin(
        &self,
        mut request: ExecRequest,
        stdin: impl Read + Send,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus> {
        request.stdin_stream = true;
        let execution = self.spawn(request)?;
        let writer = execution.stdin();
        std::thread::scope(|scope| {
            let feeder = scope.spawn(move || writer.copy_from(stdin));
            let status = execution.wait(on_output);
            let fed = feeder
                .join()
                .unwrap_or_else(|_| Err(ClientError::Disconnected("stdin thread panicked".into())));
            match (status, fed) {
                (Ok(_), Err(err @ ClientError::Local { .. })) => Err(err),
                (status, _) => status,
            }
        })
    }

    /// Runs a command and collects its whole output.
    pub fn exec_collect(&self, request: ExecRequest) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec(request, |stream, data| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(data),
            OutputStream::Stderr => stderr.extend_from_slice(data),
        })?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Sends `signal` to the process group of the running exec `exec_id`
    /// ([`Execution::id`]).
    pub fn kill(&self, exec_id: u64, signal: i32) -> Result<()> {
        let body = RequestBody::Kill {
            target: exec_id,
            signal,
        };
        match self.call("kill", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("kill", &other)),
        }
    }
}

/// A running command started by [`AgentClient::spawn`].
pub struct Execution {
    inner: Arc<Inner>,
    pid: u32,
    stream: Registered,
}

impl Execution {
    /// The request id: what [`AgentClient::kill`] takes.
    pub fn id(&self) -> u64 {
        self.stream.id
    }

    /// The command's pid in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that feeds the command's stdin (the request needs `stdin_stream: true`);
    /// usable from another thread while [`wait`](Self::wait) runs.
    pub fn stdin(&self) -> StdinWriter {
        StdinWriter {
            inner: self.inner.clone(),
            id: self.stream.id,
            credit: self.stream.credit.clone(),
        }
    }

    /// Hands the output to `on_output` until the command exits.
    pub fn wait(self, mut on_output: impl FnMut(OutputStream, &[u8])) -> Result<ExitStatus> {
        let mut acker = OutputAcker::new(&self.stream);
        loop {
            match self.stream.rx.recv() {
                Ok(ResponseBody::Stdout { data }) => {
                    on_output(OutputStream::Stdout, &data);
                    acker.consumed(&self.inner, data.len() as u64);
                }
                Ok(ResponseBody::Stderr { data }) => {
                    on_output(OutputStream::Stderr, &data);
                    acker.consumed(&self.inner, data.len() as u64);
                }
                Ok(ResponseBody::Exited { status }) => return Ok(status),
                Ok(ResponseBody::Error(err)) => return Err(ClientError::Remote(err)),
                Ok(other) => {
                    self.inner.unregister(self.stream.id);
                    return Err(unexpected("exec", &other));
                }
                Err(_) => return Err(self.inner.disconnected()),
            }
        }
    }
}

/// Feeds a running command's stdin. Cheap to clone; closing it once closes the stdin.
#[derive(Clone)]
pub struct StdinWriter {
    inner: Arc<Inner>,
    id: u64,
    credit: Arc<Credit>,
}

impl StdinWriter {
    /// Sends `data`, waiting while the agent's window is full. Fails once the command ended.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            if !self.credit.acquire(chunk.len() as u64) {
                return Err(ClientError::Disconnected(format!(
                    "command {} ended; its stdin is closed",
                    self.id
                )));
            }
            self.inner.send(
                self.id,
                RequestBody::Stdin {
                    data: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Closes the command's stdin (it reads end of file).
    pub fn close(&self) -> Result<()> {
        self.inner.send(self.id, RequestBody::StdinClose)
    }

    /// Copies `reader` to stdin until its end, then closes stdin.
    pub fn copy_from(&self, mut reader: impl Read) -> Result<()> {
        let mut buf = vec![0u8; MAX_CHUNK];
        let result = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(err) = self.write(&buf[..n]) {
                        break Err(err);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    break Err(ClientError::Local {
                        what: "reading stdin for the command".to_string(),
                        source,
                    })
                }
            }
        };
        self.close().ok();
        result
    }
}

//! `ember shell` in a real terminal (`vmtest_*`: hardware KVM or the lab): tmux runs it
//! against a live service, types into it and reads its screen.

mod common;
use common::service::Service;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a screen may take to show what a step expects.
const SCREEN_WAIT: Duration = Duration::from_secs(90);

/// A tmux server of its own (its socket in /tmp: the lab's root is read-only) with one session.
struct Tmux {
    socket: PathBuf,
    session: String,
}

impl Tmux {
    fn new(name: &str) -> Tmux {
        Tmux {
            socket: PathBuf::from(format!("/tmp/ember-tmux-{}-{name}", std::process::id())),
            session: name.to_string(),
        }
    }

    fn tmux(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        out
    }

    /// Starts `command` (shell text) in a detached 100x30 session.
    fn start(&self, command: &str) {
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            &self.session,
            "-x",
            "100",
            "-y",
            "30",
            command,
        ]);
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", &self.session, "-l", text]);
    }

    /// Presses keys by name (`Enter`, `Escape`).
    fn press(&self, key: &str) {
        self.tmux(&["send-keys", "-t", &self.session, key]);
    }

    fn line(&self, text: &str) {
        self.type_text(text);
        self.press("Enter");
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .tmux(&["capture-pane", "-p", "-t", &self.session])
                .stdout,
        )
        .into_owned()
    }

    /// Waits until the screen satisfies `ok`; returns it.
    fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_WAIT;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_for(&self, needle: &str) -> String {
        self.wait(&format!("{needle:?}"), |s| s.contains(needle))
    }

    /// Waits for a line that is exactly `line` (output, not the command that printed it).
    fn wait_for_line(&self, line: &str) -> String {
        self.wait(&format!("the line {line:?}"), |s| {
            s.lines().any(|l| l.trim_end() == line)
        })
    }

    fn kill_session(&self) {
        self.tmux(&["kill-session", "-t", &self.session]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `ember shell` (with `args`) as tmux runs it: its exit code is shown after it ends.
fn shell_command(service: &Service, args: &str) -> String {
    format!(
        "{} shell --socket {} {args}; echo EMBER-EXIT=$?; sleep 600",
        env!("CARGO_BIN_EXE_ember"),
        service.socket.display()
    )
}

#[test]
fn vmtest_shell_runs_full_screen_programs_resizes_and_reattaches() {
    let service = Service::start("shell");
    let id = service.create(json!({}));

    let first = Tmux::new("first");
    first.start(&shell_command(&service, &id));
    let screen = first.wait_for("ember: terminal pty-");
    let pty_id = screen
        .split_whitespace()
        .find(|w| w.starts_with("pty-"))
        .unwrap()
        .to_string();
    let list = service.call("GET", &format!("/sandboxes/{id}/pty"), None, 200);
    assert_eq!(list["ptys"][0]["pty_id"], pty_id.as_str(), "{list}");
    assert_eq!(list["ptys"][0]["status"], "running", "{list}");
    assert_eq!(list["ptys"][0]["cols"], 100, "{list}");

    // A shell that computes, with a terminal of the window's size and an xterm's TERM.
    first.line("echo $((6*7)); echo term=$TERM");
    first.wait_for_line("42");
    first.wait_for_line("term=xterm-256color");
    first.line("MARK=kept-$((40+2)); clear; stty size");
    first.wait_for_line("30 100");

    // A full-screen program draws its screen and quits.
    first.line("top");
    first.wait(r#"top's header ("load average", "Tasks:")"#, |s| {
        s.contains("load average") && s.contains("Tasks:")
    });
    first.type_text("q");
    // top leaves its last screen behind: what runs next shows that it has quit.
    first.line("clear; echo top-$((1+1))-quit");
    first.wait("top gone", |s| {
        s.lines().any(|l| l.trim_end() == "top-2-quit") && !s.contains("Tasks:")
    });

    // An editor: what is typed in it lands in the guest's file.
    first.line("clear; vi /tmp/note");
    first.wait_for("[New");
    first.type_text("i");
    first.type_text("written in vi over ember shell");
    first.press("Escape");
    first.type_text(":wq");
    first.press("Enter");
    let deadline = Instant::now() + SCREEN_WAIT;
    loop {
        let (status, body) = service.curl(
            "GET",
            &format!("/sandboxes/{id}/files?path=/tmp/note"),
            None,
        );
        if status == 200 && body == "written in vi over ember shell\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/tmp/note: {status} {body:?}\n{}",
            first.screen()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The window grows: the program in the sandbox sees the new size.
    first.line("clear");
    first.tmux(&[
        "resize-window",
        "-t",
        &first.session,
        "-x",
        "120",
        "-y",
        "40",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    first.line("stty size");
    first.wait_for_line("40 120");
    let list = service.call("GET", &format!("/sandboxes/{id}/pty"), None, 200);
    assert_eq!(list["ptys"][0]["cols"], 120, "{list}");

    // The client goes away (its terminal closes): the session stays, and another client
    // takes it up where it was.
    first.kill_session();
    let second = Tmux::new("second");
    second.start(&shell_command(&service, &format!("{id} --attach {pty_id}")));
    // The session's kept output is replayed first (its notice line may be cleared by the
    // replayed `clear`): the last thing the first client saw is back.
    second.wait_for_line("40 120");
    second.line("clear; echo mark=$MARK");
    second.wait_for_line("mark=kept-42");
    second.line("exit 7");
    second.wait_for_line("EMBER-EXIT=7");
    let list = service.call("GET", &format!("/sandboxes/{id}/pty"), None, 200);
    let session = &list["ptys"][0];
    assert_eq!(session["status"], "finished", "{list}");
    assert_eq!(session["exit_code"], 7, "{list}");

    signal_control_reaches_the_foreground_job(&service, &id);

    // Other commands, bounds and deletion through the API.
    service.refuse(
        "POST",
        &format!("/sandboxes/{id}/pty"),
        Some(r#"{"cols":0,"rows":10}"#),
        400,
        "invalid_request",
    );
    service.refuse(
        "GET",
        &format!("/sandboxes/{id}/pty/pty-999/connect"),
        None,
        404,
        "not_found",
    );
    service.refuse(
        "GET",
        &format!("/sandboxes/{id}/pty/{pty_id}/connect"),
        None,
        400,
        "not_a_websocket",
    );
    let sleeper = service.call(
        "POST",
        &format!("/sandboxes/{id}/pty"),
        Some(json!({"cmd": "sleep", "args": ["600"], "cols": 80, "rows": 24})),
        201,
    );
    let sleeper_id = sleeper["pty_id"].as_str().unwrap();
    let pid = sleeper["pid"].as_u64().unwrap();
    service.call(
        "DELETE",
        &format!("/sandboxes/{id}/pty/{sleeper_id}"),
        None,
        204,
    );
    let list = service.call("GET", &format!("/sandboxes/{id}/pty"), None, 200);
    let ids: Vec<&Value> = list["ptys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["pty_id"])
        .collect();
    assert!(!ids.contains(&&json!(sleeper_id)), "{list}");
    let gone = service.sh(
        &id,
        &format!("kill -0 {pid} 2>/dev/null && echo alive || echo gone"),
    );
    assert_eq!(gone["stdout"], "gone\n", "{gone}");

    // Without a terminal on stdin: piped input (its end typed as ^D); the exit code comes
    // back.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["shell", "--socket"])
        .arg(&service.socket)
        .args([id.as_str(), "--", "sh"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo piped-$((2+3)); exit 5\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("piped-5"),
        "{out:?}"
    );
}

/// A `signal` control message over the terminal's WebSocket interrupts the shell's foreground
/// job (its own process group), not the shell, which then says how the job ended.
fn signal_control_reaches_the_foreground_job(service: &Service, id: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let started = service.call(
        "POST",
        &format!("/sandboxes/{id}/pty"),
        Some(json!({"cmd": "sh", "args": ["-i"], "cols": 80, "rows": 24})),
        201,
    );
    let pty_id = started["pty_id"].as_str().unwrap().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(&service.socket)
            .await
            .unwrap();
        let url = format!("ws://ember/sandboxes/{id}/pty/{pty_id}/connect");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let mut screen = String::new();
        let mut read_until = async |ws: &mut tokio_tungstenite::WebSocketStream<_>,
                                    needle: &str| {
            let deadline = tokio::time::Instant::now() + SCREEN_WAIT;
            while !screen.contains(needle) {
                let message = tokio::time::timeout_at(deadline, ws.next())
                    .await
                    .unwrap_or_else(|_| panic!("no {needle:?} on the terminal: {screen:?}"));
                match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        screen.push_str(&String::from_utf8_lossy(&bytes))
                    }
                    Some(Ok(_)) => {}
                    other => panic!("the terminal ended before {needle:?}: {other:?} {screen:?}"),
                }
            }
        };
        let send = |text: &str| Message::Binary(text.as_bytes().to_vec().into());
        ws.send(send("echo ready-$((3*4))\n")).await.unwrap();
        read_until(&mut ws, "ready-12").await;
        ws.send(send("sleep 300\n")).await.unwrap();
        // The job is running (its own process group) before the signal goes.
        let deadline = Instant::now() + SCREEN_WAIT;
        while service.sh(id, "pgrep -x sleep || true")["stdout"] == "" {
            assert!(Instant::now() < deadline, "sleep never started: {screen:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let interrupt = json!({"type": "signal", "signal": 2}).to_string();
        ws.send(Message::Text(interrupt.into())).await.unwrap();
        ws.send(send("echo status=$?\n")).await.unwrap();
        read_until(&mut ws, "status=130").await;
        ws.send(send("exit 4\n")).await.unwrap();
        let _ = ws.close(None).await;
    });
}

//! A real libSQL server (sqld) for one test: its own loopback port and data
//! directory, killed when dropped (also when the test fails).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sqld {
    child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    args: Vec<String>,
}

/// The sqld binary named by `SQLD_BIN` (scripts/test builds it and sets it).
pub fn binary() -> PathBuf {
    match std::env::var("SQLD_BIN") {
        Ok(path) if Path::new(&path).is_file() => path.into(),
        Ok(path) => panic!("SQLD_BIN={path} is not a file"),
        Err(_) => panic!(
            "this test needs a libSQL server: set SQLD_BIN to a sqld binary, or run scripts/test, \
             which gets one through scripts/sqld.sh"
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Sqld {
    pub fn start(data: &Path, extra_args: &[String]) -> Sqld {
        let mut sqld = Sqld { child: None, port: free_port(), data: data.to_path_buf(), args: extra_args.to_vec() };
        sqld.spawn();
        sqld
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .arg("--http-listen-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("-d")
            .arg(&self.data)
            .arg("--no-welcome")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sqld");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sqld did not listen on port {} within 30 s", self.port);
    }

    /// SIGKILL: the server vanishes mid-stream.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Sqld {
    fn drop(&mut self) {
        self.kill();
    }
}

//! The `tls_inspector` listener filter: peeks at the first bytes of a connection and, if they
//! are a TLS ClientHello, extracts SNI and ALPN for filter chain matching. Nothing is consumed.

use std::time::Duration;

use tokio::net::TcpStream;

/// What the peek found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub tls: bool,
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Parse {
    Incomplete,
    NotTls,
    Tls(Hello),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }
    fn u16(&mut self) -> Option<usize> {
        Some((usize::from(self.u8()?) << 8) | usize::from(self.u8()?))
    }
    fn u24(&mut self) -> Option<usize> {
        Some((usize::from(self.u8()?) << 16) | self.u16()?)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
}

fn parse(data: &[u8]) -> Parse {
    if data.is_empty() {
        return Parse::Incomplete;
    }
    if data[0] != 0x16 {
        return Parse::NotTls;
    }
    if data.len() < 5 {
        return Parse::Incomplete;
    }
    if data[1] != 3 {
        return Parse::NotTls;
    }
    let record_len = (usize::from(data[3]) << 8) | usize::from(data[4]);
    if data.len() < 5 + record_len.min(4) {
        return Parse::Incomplete;
    }
    let mut r = Reader {
        data: &data[5..],
        pos: 0,
    };
    let Some(kind) = r.u8() else {
        return Parse::Incomplete;
    };
    if kind != 1 {
        return Parse::NotTls;
    }
    let Some(len) = r.u24() else {
        return Parse::Incomplete;
    };
    if data.len() < 5 + 4 + len {
        // ClientHellos larger than one peek are rare; ask for more.
        return Parse::Incomplete;
    }
    match client_hello(&mut r) {
        Some(hello) => Parse::Tls(hello),
        None => Parse::Tls(Hello {
            tls: true,
            ..Hello::default()
        }),
    }
}

fn client_hello(r: &mut Reader<'_>) -> Option<Hello> {
    r.take(2 + 32)?;
    let session = usize::from(r.u8()?);
    r.take(session)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    let mut hello = Hello {
        tls: true,
        ..Hello::default()
    };
    let total = r.u16()?;
    let extensions = r.take(total)?;
    let mut e = Reader {
        data: extensions,
        pos: 0,
    };
    while e.pos < extensions.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let body = e.take(len)?;
        let mut b = Reader { data: body, pos: 0 };
        match kind {
            0 => {
                let list = b.u16()?;
                let end = b.pos + list;
                while b.pos < end {
                    let name_type = b.u8()?;
                    let name_len = b.u16()?;
                    let name = b.take(name_len)?;
                    if name_type == 0 {
                        hello.server_name =
                            Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let list = b.u16()?;
                let end = b.pos + list;
                while b.pos < end {
                    let len = usize::from(b.u8()?);
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(b.take(len)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// Why the inspector gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoVerdict {
    /// `listener_filters_timeout` passed first.
    TimedOut,
    /// Peeking at the socket failed.
    Failed,
}

/// Peeks until a verdict, the timeout, or an error.
pub async fn inspect(stream: &TcpStream, timeout: Duration) -> Result<Hello, NoVerdict> {
    let work = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = 0;
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            match parse(&buf[..n]) {
                Parse::NotTls => return Some(Hello::default()),
                Parse::Tls(hello) => return Some(hello),
                Parse::Incomplete if n == 0 || n == buf.len() => return Some(Hello::default()),
                Parse::Incomplete => {
                    if n == last {
                        // No new bytes yet: wait for readability before peeking again.
                        stream.readable().await.ok()?;
                        tokio::task::yield_now().await;
                    }
                    last = n;
                }
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Some(hello)) => Ok(hello),
        Ok(None) => Err(NoVerdict::Failed),
        Err(_) => Err(NoVerdict::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello_bytes(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        let name = sni.as_bytes();
        let mut sni_body = vec![];
        sni_body.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni_body.push(0);
        sni_body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_body.extend_from_slice(name);
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&(sni_body.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni_body);
        let mut list = vec![];
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        ext.extend_from_slice(&16u16.to_be_bytes());
        ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        let mut hello = vec![3, 3];
        hello.extend_from_slice(&[0; 32]);
        hello.push(0);
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]);
        hello.extend_from_slice(&[1, 0]);
        hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        hello.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&hello);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    #[test]
    fn extracts_sni_and_alpn() {
        let bytes = client_hello_bytes("Example.COM", &["h2", "http/1.1"]);
        assert_eq!(
            parse(&bytes),
            Parse::Tls(Hello {
                tls: true,
                server_name: Some("example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()]
            })
        );
        assert_eq!(parse(&bytes[..10]), Parse::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
    }
}

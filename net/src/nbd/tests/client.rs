//! A small hand-written async NBD client for tests. It deliberately spells
//! every magic and code as a literal instead of using `proto`, so a wrong
//! constant on the server side shows up as a failure here.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Any byte stream the client can talk over (Unix or TCP).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

pub(crate) const FLAG_FUA: u16 = 1;
pub(crate) const FLAG_NO_HOLE: u16 = 2;
pub(crate) const FLAG_REQ_ONE: u16 = 8;
pub(crate) const FLAG_FAST_ZERO: u16 = 16;

pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// What the client negotiates.
#[derive(Clone, Copy)]
pub(crate) struct Negotiate {
    pub(crate) structured: bool,
    pub(crate) base_allocation: bool,
}

impl Negotiate {
    pub(crate) const SIMPLE: Self = Self { structured: false, base_allocation: false };
    pub(crate) const FULL: Self = Self { structured: true, base_allocation: true };
}

/// A finished request as the client saw it.
#[derive(Debug, Default)]
pub(crate) struct Completed {
    pub(crate) cookie: u64,
    pub(crate) error: u32,
    pub(crate) message: String,
    /// READ data (holes filled with zeros).
    pub(crate) data: Vec<u8>,
    /// BLOCK_STATUS extents: (length, flags).
    pub(crate) extents: Vec<(u32, u32)>,
    pub(crate) context_id: Option<u32>,
    /// Number of OFFSET_HOLE chunks received.
    pub(crate) hole_chunks: usize,
}

struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    partial: Completed,
}

pub(crate) struct TestClient {
    pub(crate) stream: Box<dyn Stream>,
    pub(crate) size: u64,
    pub(crate) transmission_flags: u16,
    pub(crate) block_sizes: Option<(u32, u32, u32)>,
    pub(crate) context_id: Option<u32>,
    structured: bool,
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
}

impl TestClient {
    pub(crate) async fn connect(path: &Path, export: &str, negotiate: Negotiate) -> io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(Box::new(stream), export, negotiate).await
    }

    pub(crate) async fn connect_tcp(
        addr: std::net::SocketAddr,
        export: &str,
        negotiate: Negotiate,
    ) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        Self::handshake(Box::new(stream), export, negotiate).await
    }

    /// Runs the handshake (greeting, flags, options, GO) on `stream`.
    pub(crate) async fn handshake(mut stream: Box<dyn Stream>, export: &str, negotiate: Negotiate) -> io::Result<Self> {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await?;
        if &greeting[..16] != b"NBDMAGICIHAVEOPT" || greeting[16..] != [0, 3] {
            return Err(invalid(format!("bad greeting {greeting:?}")));
        }
        stream.write_all(&3u32.to_be_bytes()).await?;
        let mut client = Self {
            stream,
            size: 0,
            transmission_flags: 0,
            block_sizes: None,
            context_id: None,
            structured: false,
            pending: HashMap::new(),
            next_cookie: 1,
        };
        if negotiate.structured {
            client.send_option(8, &[]).await?;
            let (option, reply_type, _) = client.read_option_reply().await?;
            if option != 8 || reply_type != 1 {
                return Err(invalid("STRUCTURED_REPLY not acked"));
            }
            client.structured = true;
        }
        if negotiate.base_allocation {
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            client.send_option(10, &data).await?;
            loop {
                let (_, reply_type, data) = client.read_option_reply().await?;
                match reply_type {
                    1 => break,
                    4 if &data[4..] == b"base:allocation" => {
                        client.context_id = Some(u32::from_be_bytes(data[..4].try_into().unwrap()));
                    }
                    other => return Err(invalid(format!("SET_META_CONTEXT reply {other:#x}"))),
                }
            }
        }
        // GO asking for NAME and BLOCK_SIZE.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&[0, 2, 0, 1, 0, 3]);
        client.send_option(7, &data).await?;
        loop {
            let (option, reply_type, data) = client.read_option_reply().await?;
            if option != 7 {
                return Err(invalid("GO reply echoes another option"));
            }
            match reply_type {
                1 => break,
                3 => match u16::from_be_bytes([data[0], data[1]]) {
                    0 => {
                        client.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        client.transmission_flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                    3 => {
                        let word = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                        client.block_sizes = Some((word(2), word(6), word(10)));
                    }
                    _ => {}
                },
                other => return Err(invalid(format!("GO failed with {other:#x}: {}", String::from_utf8_lossy(&data)))),
            }
        }
        Ok(client)
    }

    pub(crate) async fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut bytes = b"IHAVEOPT".to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.stream.write_all(&bytes).await
    }

    pub(crate) async fn read_option_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).await?;
        if header[..8] != 0x0003_e889_0455_65a9u64.to_be_bytes() {
            return Err(invalid("bad option reply magic"));
        }
        let word = |i: usize| u32::from_be_bytes(header[i..i + 4].try_into().unwrap());
        let mut data = vec![0u8; word(16) as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((word(8), word(12), data))
    }

    /// Sends one request and returns its cookie.
    pub(crate) async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send_with_cookie(cookie, command, flags, offset, length, payload).await?;
        Ok(cookie)
    }

    pub(crate) async fn send_with_cookie(
        &mut self,
        cookie: u64,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(28 + payload.len());
        bytes.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(payload);
        if command != CMD_DISC {
            self.pending.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    length,
                    partial: Completed {
                        cookie,
                        data: if command == CMD_READ { vec![0; length as usize] } else { Vec::new() },
                        ..Completed::default()
                    },
                },
            );
        }
        self.stream.write_all(&bytes).await
    }

    /// Reads replies until one request is complete.
    pub(crate) async fn recv(&mut self) -> io::Result<Completed> {
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic).await?;
            match u32::from_be_bytes(magic) {
                0x6744_6698 => {
                    let mut rest = [0u8; 12];
                    self.stream.read_exact(&mut rest).await?;
                    let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
                    let cookie = u64::from_be_bytes(rest[4..].try_into().unwrap());
                    let mut pending = self
                        .pending
                        .remove(&cookie)
                        .ok_or_else(|| invalid(format!("simple reply for unknown cookie {cookie}")))?;
                    if self.structured && pending.command == CMD_READ {
                        return Err(invalid("simple reply to READ under structured replies"));
                    }
                    pending.partial.error = error;
                    if pending.command == CMD_READ && error == 0 {
                        self.stream.read_exact(&mut pending.partial.data).await?;
                    } else {
                        pending.partial.data.clear();
                    }
                    return Ok(pending.partial);
                }
                0x668e_33ef => {
                    if !self.structured {
                        return Err(invalid("structured chunk without negotiation"));
                    }
                    if let Some(done) = self.read_chunk().await? {
                        return Ok(done);
                    }
                }
                other => return Err(invalid(format!("bad reply magic {other:#x}"))),
            }
        }
    }

    async fn read_chunk(&mut self) -> io::Result<Option<Completed>> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await?;
        let flags = u16::from_be_bytes([header[0], header[1]]);
        let chunk_type = u16::from_be_bytes([header[2], header[3]]);
        let cookie = u64::from_be_bytes(header[4..12].try_into().unwrap());
        let length = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let mut payload = vec![0u8; length as usize];
        self.stream.read_exact(&mut payload).await?;
        let pending =
            self.pending.get_mut(&cookie).ok_or_else(|| invalid(format!("chunk for unknown cookie {cookie}")))?;
        let u32_at = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().unwrap());
        let in_request = |offset: u64, len: u64| {
            offset >= pending.offset && offset + len <= pending.offset + u64::from(pending.length)
        };
        match chunk_type {
            0 if length == 0 => {}
            1 if pending.command == CMD_READ && length > 8 => {
                let offset = u64_at(0);
                let data = &payload[8..];
                if !in_request(offset, data.len() as u64) {
                    return Err(invalid("OFFSET_DATA outside the request"));
                }
                let start = (offset - pending.offset) as usize;
                pending.partial.data[start..start + data.len()].copy_from_slice(data);
            }
            2 if pending.command == CMD_READ && length == 12 => {
                let (offset, size) = (u64_at(0), u32_at(8));
                if size == 0 || !in_request(offset, u64::from(size)) {
                    return Err(invalid("bad OFFSET_HOLE"));
                }
                pending.partial.hole_chunks += 1;
            }
            5 if pending.command == CMD_BLOCK_STATUS && length >= 12 && (length - 4) % 8 == 0 => {
                pending.partial.context_id = Some(u32_at(0));
                for i in 0..((length as usize - 4) / 8) {
                    let (len, state) = (u32_at(4 + 8 * i), u32_at(8 + 8 * i));
                    if len == 0 {
                        return Err(invalid("zero-length extent"));
                    }
                    pending.partial.extents.push((len, state));
                }
            }
            0x8001 if length >= 6 => {
                let error = u32_at(0);
                let message_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                if error == 0 || 6 + message_len != payload.len() {
                    return Err(invalid("bad ERROR chunk"));
                }
                pending.partial.error = error;
                pending.partial.message = String::from_utf8_lossy(&payload[6..]).into_owned();
            }
            other => return Err(invalid(format!("unexpected chunk type {other:#x} / length {length}"))),
        }
        if flags & 1 == 0 {
            return Ok(None);
        }
        let pending = self.pending.remove(&cookie).expect("present above");
        let mut done = pending.partial;
        if done.error != 0 {
            done.data.clear();
        }
        Ok(Some(done))
    }

    /// Sends one request and waits for its reply (nothing else in flight).
    pub(crate) async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Completed> {
        let cookie = self.send(command, flags, offset, length, payload).await?;
        let done = self.recv().await?;
        assert_eq!(done.cookie, cookie, "reply for another request");
        Ok(done)
    }

    pub(crate) async fn read(&mut self, offset: u64, length: u32) -> io::Result<Completed> {
        self.call(CMD_READ, 0, offset, length, &[]).await
    }

    pub(crate) async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<Completed> {
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data).await
    }

    /// Reads until the server closes the connection; errors if it sends
    /// anything or does not close within the timeout.
    pub(crate) async fn expect_closed(&mut self) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), self.stream.read(&mut byte))
            .await
            .expect("server did not close the connection");
        match read {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
}

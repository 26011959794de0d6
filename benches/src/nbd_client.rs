//! A minimal blocking NBD client for benchmarks: fixed-newstyle handshake, `NBD_OPT_GO`,
//! simple replies (structured replies are never requested), READ/WRITE/FLUSH/DISC, and a
//! sliding window of requests in flight.
//!
//! It is deliberately not `keel-net`'s own codec: the bench should measure the server
//! through the wire format a real client uses. Values follow the NBD spec (see
//! `/work/shared/prior-art/nbd.md` §1.2-1.5); every integer is big-endian.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERROR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

/// Transmission flag: the server accepts FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;

/// Buffer sizes of the client's socket halves: a window of small requests goes out in one
/// `write`, and replies are read in bulk.
const BUFFER_BYTES: usize = 256 * 1024;

/// An NBD command the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1), without FUA.
    Write,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Flush => 3,
        }
    }
}

/// One connection in transmission phase.
pub struct NbdClient {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    size: u64,
    flags: u16,
    next_cookie: u64,
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connects to the Unix socket at `path` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(path: &Path, export: &str) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        let mut reader = BufReader::with_capacity(BUFFER_BYTES, stream.try_clone()?);
        let mut writer = BufWriter::with_capacity(BUFFER_BYTES, stream);

        if read_u64(&mut reader)? != NBDMAGIC || read_u64(&mut reader)? != IHAVEOPT {
            return Err(protocol("not a fixed-newstyle NBD server (bad greeting magic)".into()));
        }
        let server_flags = read_u16(&mut reader)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(format!("server does not offer fixed newstyle (flags {server_flags:#x})")));
        }
        let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        writer.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO: u32 name length, name, u16 number of info requests (none: the
        // server always sends NBD_INFO_EXPORT).
        let name = export.as_bytes();
        let data_len = u32::try_from(4 + name.len() + 2).map_err(|_| protocol("export name too long".into()))?;
        writer.write_all(&IHAVEOPT.to_be_bytes())?;
        writer.write_all(&OPT_GO.to_be_bytes())?;
        writer.write_all(&data_len.to_be_bytes())?;
        writer.write_all(&(name.len() as u32).to_be_bytes())?;
        writer.write_all(name)?;
        writer.write_all(&0u16.to_be_bytes())?;
        writer.flush()?;

        let mut export_info = None;
        loop {
            if read_u64(&mut reader)? != OPTION_REPLY_MAGIC {
                return Err(protocol("bad option reply magic".into()));
            }
            let option = read_u32(&mut reader)?;
            let reply_type = read_u32(&mut reader)?;
            let len = read_u32(&mut reader)?;
            if option != OPT_GO {
                return Err(protocol(format!("reply to option {option}, expected GO")));
            }
            if len > 64 * 1024 {
                return Err(protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            reader.read_exact(&mut data)?;
            match reply_type {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export_info = Some((size, flags));
                }
                REP_INFO => {}
                t if t & REP_ERROR_BIT != 0 => {
                    return Err(protocol(format!(
                        "server refused export {export:?} (reply {t:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                t => return Err(protocol(format!("unexpected option reply type {t}"))),
            }
        }
        let (size, flags) = export_info.ok_or_else(|| protocol("GO acknowledged without NBD_INFO_EXPORT".into()))?;
        Ok(Self { reader, writer, size, flags, next_cookie: 1 })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn send(&mut self, command: Command, offset: u64, len: u32, payload: &[u8]) -> io::Result<()> {
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&0u16.to_be_bytes());
        header[6..8].copy_from_slice(&command.code().to_be_bytes());
        header[8..16].copy_from_slice(&self.next_cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        self.next_cookie += 1;
        self.writer.write_all(&header)?;
        // A payload larger than the buffer bypasses it (one extra `write` for the header).
        self.writer.write_all(payload)
    }

    /// Reads one simple reply; for a READ, `data` receives the payload.
    fn receive(&mut self, data: Option<&mut [u8]>) -> io::Result<()> {
        let mut reply = [0u8; 16];
        self.reader.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(reply[8..16].try_into().expect("8 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x} (structured replies were not requested)")));
        }
        if cookie == 0 || cookie >= self.next_cookie {
            return Err(protocol(format!("reply for unknown cookie {cookie}")));
        }
        if error != 0 {
            return Err(io::Error::other(format!("server answered request {cookie} with errno {error}")));
        }
        if let Some(data) = data {
            self.reader.read_exact(data)?;
        }
        Ok(())
    }

    /// Runs `count` requests of one kind with up to `depth` in flight, request `i` at
    /// `offset(i)`. A write sends `data`; a read receives `data.len()` bytes into `data`
    /// (replies may come back in any order: every read has the same length, so they all
    /// land in the same buffer). Flushes ignore `offset` and `data`.
    pub fn pipeline(
        &mut self,
        command: Command,
        count: u64,
        depth: usize,
        data: &mut [u8],
        mut offset: impl FnMut(u64) -> u64,
    ) -> io::Result<()> {
        let depth = depth.max(1) as u64;
        let len = match command {
            Command::Flush => 0,
            _ => u32::try_from(data.len()).map_err(|_| protocol("request larger than 4 GiB".into()))?,
        };
        let (mut sent, mut done) = (0u64, 0u64);
        while done < count {
            while sent < count && sent - done < depth {
                let payload: &[u8] = if command == Command::Write { data } else { &[] };
                let at = if command == Command::Flush { 0 } else { offset(sent) };
                self.send(command, at, len, payload)?;
                sent += 1;
            }
            self.writer.flush()?;
            let into = if command == Command::Read { Some(&mut *data) } else { None };
            self.receive(into)?;
            done += 1;
        }
        Ok(())
    }

    /// One WRITE of `data` at `offset`, answered before returning.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("request larger than 4 GiB".into()))?;
        self.send(Command::Write, offset, len, data)?;
        self.writer.flush()?;
        self.receive(None)
    }

    /// One READ into `buf` at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| protocol("request larger than 4 GiB".into()))?;
        self.send(Command::Read, offset, len, &[])?;
        self.writer.flush()?;
        self.receive(Some(buf))
    }

    /// One FLUSH.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send(Command::Flush, 0, 0, &[])?;
        self.writer.flush()?;
        self.receive(None)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[6..8].copy_from_slice(&2u16.to_be_bytes());
        header[8..16].copy_from_slice(&self.next_cookie.to_be_bytes());
        self.writer.write_all(&header)?;
        self.writer.flush()?;
        // The server closes after DISC; wait for that so its connection task is done
        // before the caller shuts the server down.
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
        Ok(())
    }
}

//! A deliberately small, blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies,
//! one request at a time. The black-box tests use real clients (qemu-io, libnbd, fio);
//! this one exists so crash trials know exactly which replies arrived before a kill.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;

/// An NBD error reply: the server answered, with this errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdError(pub u32);

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NBD error {}", self.0)
    }
}

impl std::error::Error for NbdError {}

/// A connected client in transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `socket` and selects `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> Result<Self> {
        let mut stream = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        if u64::from_be_bytes(hello[0..8].try_into()?) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into()?) != IHAVEOPT
        {
            bail!("not an NBD server");
        }
        stream.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(data.len() as u32).to_be_bytes());
        option.extend_from_slice(&data);
        stream.write_all(&option)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            if u64::from_be_bytes(header[0..8].try_into()?) != REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let reply = u32::from_be_bytes(header[12..16].try_into()?);
            let len = u32::from_be_bytes(header[16..20].try_into()?) as usize;
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload)?;
            if reply == REP_ACK {
                break;
            }
            if reply & 0x8000_0000 != 0 {
                bail!("server refused export {export:?}: reply {reply:#x} {}", String::from_utf8_lossy(&payload));
            }
            if payload.len() >= 12 && u16::from_be_bytes(payload[0..2].try_into()?) == INFO_EXPORT {
                size = Some(u64::from_be_bytes(payload[2..10].try_into()?));
                flags = u16::from_be_bytes(payload[10..12].try_into()?);
            }
        }
        let size = size.context("server sent no NBD_INFO_EXPORT")?;
        Ok(Self { stream, size, flags, cookie: 0 })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn request(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Result<()> {
        self.cookie += 1;
        let mut header = Vec::with_capacity(28 + payload.len());
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&self.cookie.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(payload);
        self.stream.write_all(&header)?;
        Ok(())
    }

    fn reply(&mut self) -> Result<()> {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        if u32::from_be_bytes(reply[0..4].try_into()?) != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        if u64::from_be_bytes(reply[8..16].try_into()?) != self.cookie {
            bail!("reply for another request");
        }
        match u32::from_be_bytes(reply[4..8].try_into()?) {
            0 => Ok(()),
            errno => Err(NbdError(errno).into()),
        }
    }

    /// Writes `data` at `offset`; with `fua` the reply means durable.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.request(CMD_WRITE, if fua { FLAG_FUA } else { 0 }, offset, data.len() as u32, data)?;
        self.reply()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.reply()?;
        self.stream.read_exact(buf)?;
        Ok(())
    }

    /// Makes everything answered so far durable.
    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply()
    }

    /// Zeroes a range (holes allowed).
    pub fn write_zeroes(&mut self, offset: u64, length: u32) -> Result<()> {
        self.request(CMD_WRITE_ZEROES, 0, offset, length, &[])?;
        self.reply()
    }

    /// Discards a range.
    pub fn trim(&mut self, offset: u64, length: u32) -> Result<()> {
        self.request(CMD_TRIM, 0, offset, length, &[])?;
        self.reply()
    }

    /// Sends DISC and closes.
    pub fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }

    /// The raw stream, for tests that misbehave on purpose.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

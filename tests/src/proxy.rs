//! A userspace UDP fault proxy, for tests that need to drop, delay, duplicate, reorder or
//! cut the traffic between two processes on loopback. The kernel of the test machines has
//! no `netem` qdisc, and this also works without root.
//!
//! [`UdpProxy::start`] listens on `127.0.0.1:0`. Every client address that sends to it gets
//! its own upstream socket, connected to the target, so the target sees one stable peer
//! address per client (QUIC connections, whose migration is off, stay intact); datagrams
//! from the target come back to that client from the listening address. The faults apply
//! per direction at runtime ([`UdpProxy::cut`], [`UdpProxy::drop_probability`],
//! [`UdpProxy::delay`], [`UdpProxy::jitter`], [`UdpProxy::duplicate_probability`]).
//!
//! # Threads
//! `proxy-NAME-in` reads the listening socket, one `proxy-NAME-up-PORT` per client reads its
//! upstream socket, and `proxy-NAME-delay` sends delayed datagrams when they are due. They
//! notice a stop within [`POLL`] (socket read timeout) and are joined when the proxy drops.
//!
//! # Bounds
//! At most [`CLIENTS_MAX`] clients (datagrams from more are dropped and counted), at most
//! [`DELAY_QUEUE_BYTES_MAX`] bytes waiting in the delay queue (beyond: dropped and counted,
//! as a full router queue would).

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Most client addresses served at once.
pub const CLIENTS_MAX: usize = 64;
/// Most bytes held in the delay queue.
pub const DELAY_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Socket buffers asked for (the kernel caps them at `net.core.rmem_max`/`wmem_max`), so
/// that bursts of QUIC datagrams are not dropped by the proxy's own sockets.
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;
/// Largest UDP datagram.
const DATAGRAM_MAX: usize = 65_536;

/// Which way a datagram travels through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client to the target.
    ToTarget,
    /// From the target back to a client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::ToClient => 1,
        }
    }
}

/// The faults applied to one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Drop everything (also what sits in the delay queue when it comes due).
    pub cut: bool,
    /// Probability of dropping a datagram, in `[0, 1]`.
    pub drop_probability: f64,
    /// Probability of sending a datagram twice, in `[0, 1]`.
    pub duplicate_probability: f64,
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`, drawn per datagram; datagrams therefore
    /// overtake each other (reordering).
    pub jitter: Duration,
}

/// Counters, per direction: index 0 is [`Direction::ToTarget`], 1 is [`Direction::ToClient`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Datagrams sent on (duplicates count twice).
    pub forwarded: [u64; 2],
    /// Datagrams dropped (cut, random loss, full queue, too many clients).
    pub dropped: [u64; 2],
    /// Extra copies sent.
    pub duplicated: [u64; 2],
    /// Datagrams that went through the delay queue.
    pub delayed: [u64; 2],
}

impl ProxyStats {
    /// Forwarded in both directions.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded.iter().sum()
    }

    /// Dropped in both directions.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    duplicated: [AtomicU64; 2],
    delayed: [AtomicU64; 2],
}

/// Where a datagram goes.
#[derive(Debug, Clone)]
enum Route {
    /// Through a client's upstream socket (connected to the target).
    Upstream(Arc<UdpSocket>),
    /// From the listening socket to this client.
    Client(SocketAddr),
}

/// A datagram waiting in the delay queue (a min-heap on `due`, then arrival order).
#[derive(Debug)]
struct Delayed {
    due: Instant,
    order: u64,
    direction: Direction,
    route: Route,
    data: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap and the earliest datagram must come out first.
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

#[derive(Debug, Default)]
struct DelayQueue {
    heap: BinaryHeap<Delayed>,
    bytes: usize,
    next_order: u64,
}

#[derive(Debug)]
struct Inner {
    name: String,
    listen: UdpSocket,
    target: SocketAddr,
    faults: Mutex<[Faults; 2]>,
    counters: Counters,
    stop: AtomicBool,
    queue: Mutex<DelayQueue>,
    queue_changed: Condvar,
    rng: Mutex<StdRng>,
    upstreams: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    upstream_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A UDP proxy from `127.0.0.1:PORT` to a target, with faults injected at runtime. Stops
/// (and joins its threads) when dropped.
#[derive(Debug)]
pub struct UdpProxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking proxy thread must not take the test's cleanup down with it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn enlarge_buffers(socket: &UdpSocket) {
    let bytes: libc::c_int = SOCKET_BUFFER_BYTES;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; the fd is
        // owned by `socket` for the duration of the call.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const bytes).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl UdpProxy {
    /// Starts a proxy to `target`, named `"proxy"` in thread names.
    pub fn start(target: SocketAddr) -> Result<Self> {
        Self::start_named("proxy", target)
    }

    /// Starts a proxy to `target`; `name` appears in its thread names and messages.
    pub fn start_named(name: &str, target: SocketAddr) -> Result<Self> {
        let listen = UdpSocket::bind("127.0.0.1:0").context("bind the proxy's listening socket")?;
        listen.set_read_timeout(Some(POLL))?;
        enlarge_buffers(&listen);
        let addr = listen.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            listen,
            target,
            faults: Mutex::new([Faults::default(); 2]),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            queue: Mutex::new(DelayQueue::default()),
            queue_changed: Condvar::new(),
            rng: Mutex::new(StdRng::from_entropy()),
            upstreams: Mutex::new(HashMap::new()),
            upstream_threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let listener = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name(format!("proxy-{name}-in"))
                .spawn(move || listener.listen_loop())
                .context("spawn the proxy's listener thread")?,
        );
        let delayer = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name(format!("proxy-{name}-delay"))
                .spawn(move || delayer.delay_loop())
                .context("spawn the proxy's delay thread")?,
        );
        Ok(Self { inner, addr, threads })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where datagrams are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    /// The proxy's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn update(&self, directions: &[Direction], f: impl Fn(&mut Faults)) {
        let mut faults = lock(&self.inner.faults);
        for direction in directions {
            f(&mut faults[direction.index()]);
        }
        drop(faults);
        // A cut also applies to what is queued: wake the delay thread to drop it now.
        self.inner.queue_changed.notify_all();
    }

    const BOTH: [Direction; 2] = [Direction::ToTarget, Direction::ToClient];

    /// Drops everything, both ways (`true`), or stops doing so (`false`).
    pub fn cut(&self, cut: bool) {
        self.update(&Self::BOTH, |f| f.cut = cut);
    }

    /// Cuts (or restores) one direction only: an asymmetric partition.
    pub fn cut_direction(&self, direction: Direction, cut: bool) {
        self.update(&[direction], |f| f.cut = cut);
    }

    /// Drops each datagram, both ways, with probability `p`.
    pub fn drop_probability(&self, p: f64) {
        assert!((0.0..=1.0).contains(&p), "drop probability {p} outside [0, 1]");
        self.update(&Self::BOTH, |f| f.drop_probability = p);
    }

    /// Sends each datagram, both ways, twice with probability `p`.
    pub fn duplicate_probability(&self, p: f64) {
        assert!((0.0..=1.0).contains(&p), "duplicate probability {p} outside [0, 1]");
        self.update(&Self::BOTH, |f| f.duplicate_probability = p);
    }

    /// Delays each datagram, both ways, by `delay`.
    pub fn delay(&self, delay: Duration) {
        self.update(&Self::BOTH, |f| f.delay = delay);
    }

    /// Adds a random extra delay in `[0, jitter)` per datagram, both ways (this reorders).
    pub fn jitter(&self, jitter: Duration) {
        self.update(&Self::BOTH, |f| f.jitter = jitter);
    }

    /// Replaces the faults of one direction.
    pub fn set_faults(&self, direction: Direction, faults: Faults) {
        self.update(&[direction], |f| *f = faults);
    }

    /// Back to a clean link, both ways.
    pub fn heal(&self) {
        self.update(&Self::BOTH, |f| *f = Faults::default());
    }

    /// The faults of one direction.
    pub fn faults(&self, direction: Direction) -> Faults {
        lock(&self.inner.faults)[direction.index()]
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.inner.counters;
        let load = |a: &[AtomicU64; 2]| [a[0].load(Ordering::Relaxed), a[1].load(Ordering::Relaxed)];
        ProxyStats {
            forwarded: load(&c.forwarded),
            dropped: load(&c.dropped),
            duplicated: load(&c.duplicated),
            delayed: load(&c.delayed),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.queue_changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let upstreams = std::mem::take(&mut *lock(&self.inner.upstream_threads));
        for thread in upstreams {
            let _ = thread.join();
        }
    }
}

impl Inner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn count(&self, counter: &[AtomicU64; 2], direction: Direction, n: u64) {
        counter[direction.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Client → target.
    fn listen_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        while !self.stopped() {
            let (len, from) = match self.listen.recv_from(&mut buf) {
                Ok(received) => received,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                // ICMP errors from earlier sends (a client went away) surface here; go on.
                Err(_) => continue,
            };
            let Some(upstream) = self.upstream_for(from) else {
                self.count(&self.counters.dropped, Direction::ToTarget, 1);
                continue;
            };
            self.forward(Direction::ToTarget, Route::Upstream(upstream), &buf[..len]);
        }
    }

    /// The client's upstream socket, created (with its reader thread) on first use.
    fn upstream_for(self: &Arc<Self>, client: SocketAddr) -> Option<Arc<UdpSocket>> {
        let mut upstreams = lock(&self.upstreams);
        if let Some(socket) = upstreams.get(&client) {
            return Some(Arc::clone(socket));
        }
        if upstreams.len() >= CLIENTS_MAX {
            return None;
        }
        let bind: SocketAddr = if self.target.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }.parse().ok()?;
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(self.target).ok()?;
        socket.set_read_timeout(Some(POLL)).ok()?;
        enlarge_buffers(&socket);
        let socket = Arc::new(socket);
        upstreams.insert(client, Arc::clone(&socket));
        drop(upstreams);
        let (inner, reader) = (Arc::clone(self), Arc::clone(&socket));
        let port = socket.local_addr().map(|a| a.port()).unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}-up-{port}", self.name))
            .spawn(move || inner.upstream_loop(&reader, client))
            .ok()?;
        lock(&self.upstream_threads).push(thread);
        Some(socket)
    }

    /// Target → one client.
    fn upstream_loop(&self, socket: &UdpSocket, client: SocketAddr) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        while !self.stopped() {
            match socket.recv(&mut buf) {
                Ok(len) => self.forward(Direction::ToClient, Route::Client(client), &buf[..len]),
                // Timeouts, and ICMP "port unreachable" while the target is down: go on.
                Err(_) => continue,
            }
        }
    }

    /// Applies the faults of `direction` to one datagram.
    fn forward(&self, direction: Direction, route: Route, data: &[u8]) {
        let faults = lock(&self.faults)[direction.index()];
        let (dropped, copies, delays) = {
            let mut rng = lock(&self.rng);
            let dropped = faults.cut || (faults.drop_probability > 0.0 && rng.gen_bool(faults.drop_probability));
            let copies = if !dropped && faults.duplicate_probability > 0.0 && rng.gen_bool(faults.duplicate_probability)
            {
                2
            } else {
                1
            };
            let delays: Vec<Duration> = (0..copies)
                .map(|_| {
                    let jitter = if faults.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(rng.gen_range(0..faults.jitter.as_nanos() as u64))
                    };
                    faults.delay + jitter
                })
                .collect();
            (dropped, copies, delays)
        };
        if dropped {
            self.count(&self.counters.dropped, direction, 1);
            return;
        }
        if copies > 1 {
            self.count(&self.counters.duplicated, direction, copies - 1);
        }
        for delay in delays {
            if delay.is_zero() {
                self.send(direction, &route, data);
            } else {
                self.enqueue(direction, route.clone(), data, delay);
            }
        }
    }

    fn enqueue(&self, direction: Direction, route: Route, data: &[u8], delay: Duration) {
        let mut queue = lock(&self.queue);
        if queue.bytes + data.len() > DELAY_QUEUE_BYTES_MAX {
            drop(queue);
            self.count(&self.counters.dropped, direction, 1);
            return;
        }
        let order = queue.next_order;
        queue.next_order += 1;
        queue.bytes += data.len();
        queue.heap.push(Delayed { due: Instant::now() + delay, order, direction, route, data: data.to_vec() });
        drop(queue);
        self.count(&self.counters.delayed, direction, 1);
        self.queue_changed.notify_all();
    }

    /// Sends delayed datagrams when due (dropping them if their direction was cut meanwhile).
    fn delay_loop(&self) {
        let mut queue = lock(&self.queue);
        while !self.stopped() {
            let now = Instant::now();
            let wait = match queue.heap.peek() {
                Some(first) if first.due <= now => {
                    let Some(item) = queue.heap.pop() else { continue };
                    queue.bytes -= item.data.len();
                    drop(queue);
                    if lock(&self.faults)[item.direction.index()].cut {
                        self.count(&self.counters.dropped, item.direction, 1);
                    } else {
                        self.send(item.direction, &item.route, &item.data);
                    }
                    queue = lock(&self.queue);
                    continue;
                }
                Some(first) => (first.due - now).min(POLL),
                None => POLL,
            };
            queue = self.queue_changed.wait_timeout(queue, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn send(&self, direction: Direction, route: &Route, data: &[u8]) {
        let sent = match route {
            Route::Upstream(socket) => socket.send(data).is_ok(),
            Route::Client(client) => self.listen.send_to(data, client).is_ok(),
        };
        let counter = if sent { &self.counters.forwarded } else { &self.counters.dropped };
        self.count(counter, direction, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address and a stop flag.
    fn echo() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(POLL)).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..len], from);
                }
            }
        });
        (addr, stop, thread)
    }

    /// Waits (at most 5 s) until the proxy's counters satisfy `check`: a datagram can reach
    /// its receiver a moment before the proxy thread counts it.
    fn wait_stats(proxy: &UdpProxy, check: impl Fn(&ProxyStats) -> bool) -> ProxyStats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = proxy.stats();
            if check(&stats) || Instant::now() > deadline {
                return stats;
            }
            std::thread::yield_now();
        }
    }

    fn client(proxy: &UdpProxy) -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(proxy.addr()).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        socket
    }

    #[test]
    fn forwards_both_ways_and_cuts() {
        let (target, stop, echo_thread) = echo();
        let proxy = UdpProxy::start(target).unwrap();
        let socket = client(&proxy);
        let mut buf = [0u8; 16];
        socket.send(b"ping").unwrap();
        let len = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"ping");
        proxy.cut(true);
        socket.send(b"lost").unwrap();
        assert!(socket.recv(&mut buf).is_err(), "a cut proxy forwarded a datagram");
        assert_eq!(wait_stats(&proxy, |s| s.dropped[0] == 1).dropped[0], 1);
        proxy.cut(false);
        socket.send(b"back").unwrap();
        let len = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"back");
        assert_eq!(wait_stats(&proxy, |s| s.forwarded == [2, 2]).forwarded, [2, 2]);
        drop(proxy);
        stop.store(true, Ordering::SeqCst);
        echo_thread.join().unwrap();
    }

    #[test]
    fn delays_duplicates_and_reorders() {
        let (target, stop, echo_thread) = echo();
        let proxy = UdpProxy::start(target).unwrap();
        let socket = client(&proxy);
        proxy.set_faults(
            Direction::ToTarget,
            Faults { delay: Duration::from_millis(20), jitter: Duration::from_millis(30), ..Faults::default() },
        );
        let sent_at = Instant::now();
        for i in 0..50u8 {
            socket.send(&[i]).unwrap();
        }
        let mut order = Vec::new();
        let mut buf = [0u8; 4];
        for _ in 0..50 {
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(len, 1);
            order.push(buf[0]);
        }
        assert!(sent_at.elapsed() >= Duration::from_millis(20), "datagrams were not delayed");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u8>>(), "a delayed datagram was lost");
        assert_ne!(order, sorted, "50 datagrams with 30 ms of jitter arrived in order");
        proxy.heal();
        proxy.duplicate_probability(1.0);
        socket.send(b"x").unwrap();
        // Twice to the target, and each echo twice back: four copies.
        for _ in 0..4 {
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"x");
        }
        assert_eq!(wait_stats(&proxy, |s| s.duplicated == [1, 2]).duplicated, [1, 2]);
        drop(proxy);
        stop.store(true, Ordering::SeqCst);
        echo_thread.join().unwrap();
    }

    #[test]
    fn drops_about_the_asked_fraction() {
        let (target, stop, echo_thread) = echo();
        let proxy = UdpProxy::start(target).unwrap();
        proxy.set_faults(Direction::ToTarget, Faults { drop_probability: 0.5, ..Faults::default() });
        let socket = client(&proxy);
        for i in 0..400u16 {
            socket.send(&i.to_le_bytes()).unwrap();
        }
        // Every datagram is either dropped or forwarded, and the echoes come back.
        let mut received = 0;
        let mut buf = [0u8; 4];
        while socket.recv(&mut buf).is_ok() {
            received += 1;
        }
        let stats = proxy.stats();
        assert_eq!(stats.dropped[0] + stats.forwarded[0], 400);
        assert_eq!(received, stats.forwarded[0]);
        assert!((100..300).contains(&stats.dropped[0]), "dropped {} of 400 at p = 0.5", stats.dropped[0]);
        drop(proxy);
        stop.store(true, Ordering::SeqCst);
        echo_thread.join().unwrap();
    }
}

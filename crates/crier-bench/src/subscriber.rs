//! What a subscriber of any transport (SSE and WebSocket in `client`,
//! gRPC in `grpc`) reports to and shares: the [`Listener`] its events go
//! to, why its stream ended, the clock events are stamped with, and how
//! its socket binds a source address.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpSocket;

use super::decode::Line;

/// Now, in microseconds since the Unix epoch: the clock events are stamped
/// with, comparable across processes on one machine.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Receives a subscriber's events: the start of each `data:` line's value,
/// and when the read that brought it arrived (µs since the Unix epoch).
pub trait Listener: Send + 'static {
    fn on_data(&mut self, data: &[u8], arrived_us: u64);

    /// Every line of the stream the bench acts on, in order: data, event
    /// type, id and end of event. By default only data lines matter, given
    /// to [`on_data`](Listener::on_data) as they come; a listener that must
    /// count events as EventSource does (only once complete) uses the rest.
    fn on_line(&mut self, line: Line<'_>, arrived_us: u64) {
        if let Line::Data(data) = line {
            self.on_data(data, arrived_us);
        }
    }

    /// The subscriber closed its connection when its crowd was told to
    /// leave (an event read in part is lost, as for EventSource).
    fn on_leave(&mut self) {}

    /// The subscriber is back: it sent its request at `sent_us` and its new
    /// stream was open (head and first bytes read) at `opened_us`.
    fn on_rejoin(&mut self, _sent_us: u64, _opened_us: u64) {}
}

/// A subscriber that only holds its connection.
impl Listener for () {
    fn on_data(&mut self, _: &[u8], _: u64) {}
}

/// Why a subscriber's stream ended.
pub enum Ending {
    /// The bench stopped it.
    Stopped,
    /// The hub ended or broke it (or it never opened): the reason.
    Dropped(String),
}

/// Leaves the choice of a bound socket's port to `connect`, which needs it
/// free only for this 4-tuple and may reuse one in TIME_WAIT
/// (`net.ipv4.tcp_tw_reuse`, on for loopback by default). Otherwise `bind`
/// must find a port free for any destination: a previous run's TIME_WAITs
/// (a minute) exhaust the range, and the search slows connecting to a crawl
/// long before that.
#[cfg(target_os = "linux")]
pub fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a live socket descriptor, and an option value of the size
    // given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

//! The write floor: what one non-blocking `write()` of a pre-framed message to one loopback
//! TCP socket costs the writing thread on this machine, measured in the same run as the
//! transports so that each transport's CPU per delivery can be read as a ratio to it.
//!
//! It does what `shared/tools/floor.c` does: `subscribers` connected socket pairs; a writer
//! thread writes each of `messages` frames of `frame_bytes`, at `rate` per second, to every
//! socket with one `write()` each; a reader thread drains all sockets with `epoll` (it stands
//! in for the clients, and its CPU is not counted). On loopback the receiver's TCP input runs
//! in the sender's softirq, so the writer pays for it, exactly as a server measured by a load
//! generator on the same machine does. Every server pays this much for a delivery written
//! alone; only writing several messages at once goes below it.

use std::{
    io::{self, Read},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// One floor measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// Sockets written to.
    pub subscribers: usize,
    /// Messages, each written to every socket.
    pub messages: usize,
    /// Messages per second.
    pub rate: f64,
    /// Bytes of each write.
    pub frame_bytes: usize,
    /// Writes that took the whole frame.
    pub writes: u64,
    /// Writes that took less (the reader fell behind).
    pub short_writes: u64,
    /// CPU time of the writer thread, seconds.
    pub writer_cpu_s: f64,
    /// The floor: writer CPU per write, µs.
    pub cpu_us_per_delivery: f64,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// Measures the floor. Blocking: call it from a thread that may block.
pub fn measure(
    subscribers: usize,
    messages: usize,
    rate: f64,
    frame_bytes: usize,
    writer_cpus: Option<&[usize]>,
) -> io::Result<Floor> {
    let writer_cpus = writer_cpus.map(<[usize]>::to_vec);
    // The writer runs on a thread of its own, on the server's CPUs when the bench splits
    // them; the reader stays with the clients.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(cpus) = &writer_cpus {
                    super::affinity::pin(cpus)?;
                }
                write_floor(subscribers, messages, rate, frame_bytes)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("floor writer panicked")))
    })
}

fn write_floor(
    subscribers: usize,
    messages: usize,
    rate: f64,
    frame_bytes: usize,
) -> io::Result<Floor> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(subscribers);
    let mut readers = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let reader = TcpStream::connect(addr)?;
        let (writer, _) = listener.accept()?;
        writer.set_nodelay(true)?;
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        writers.push(writer);
        readers.push(reader);
    }
    let done = Arc::new(AtomicBool::new(false));
    let expected = (subscribers * messages * frame_bytes) as u64;
    let drain = {
        let done = done.clone();
        std::thread::Builder::new()
            .name("floor-reader".into())
            .spawn(move || read_all(readers, expected, &done))?
    };
    let frame = vec![b'x'; frame_bytes];
    let (mut writes, mut short_writes) = (0u64, 0u64);
    let start_cpu = thread_cpu();
    let start = Instant::now();
    for m in 0..messages {
        let due = start + Duration::from_secs_f64(m as f64 / rate);
        while Instant::now() < due {
            std::thread::sleep(Duration::from_micros(200));
        }
        for writer in &writers {
            // One `write(2)`, as a server's write of one frame.
            let written = rustix::io::write(writer, &frame);
            if written == Ok(frame.len()) {
                writes += 1;
            } else {
                short_writes += 1;
            }
        }
    }
    let cpu = thread_cpu().saturating_sub(start_cpu).as_secs_f64();
    done.store(true, Ordering::Release);
    let _ = drain.join();
    Ok(Floor {
        subscribers,
        messages,
        rate,
        frame_bytes,
        writes,
        short_writes,
        writer_cpu_s: cpu,
        cpu_us_per_delivery: cpu * 1e6 / writes.max(1) as f64,
    })
}

/// Drains every socket with `epoll` until `expected` bytes were read, or `done` is set and
/// nothing more arrives.
fn read_all(readers: Vec<TcpStream>, expected: u64, done: &AtomicBool) {
    use rustix::event::epoll;
    let Ok(poller) = epoll::create(epoll::CreateFlags::CLOEXEC) else {
        return;
    };
    for (index, reader) in readers.iter().enumerate() {
        let _ = epoll::add(
            &poller,
            reader,
            epoll::EventData::new_u64(index as u64),
            epoll::EventFlags::IN,
        );
    }
    let mut events = Vec::with_capacity(256);
    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    let tick = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    while got < expected {
        events.clear();
        let ready = epoll::wait(
            &poller,
            rustix::buffer::spare_capacity(&mut events),
            Some(&tick),
        );
        if ready.unwrap_or(0) == 0 {
            if done.load(Ordering::Acquire) {
                break;
            }
            continue;
        }
        for event in &events {
            let mut reader = &readers[event.data.u64() as usize];
            while let Ok(read) = reader.read(&mut buf) {
                if read == 0 {
                    break;
                }
                got += read as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_writes_every_frame_to_every_socket() {
        let floor = measure(3, 20, 2000.0, 190, None).unwrap();
        assert_eq!(floor.writes + floor.short_writes, 60);
        assert_eq!(
            floor.writes, 60,
            "loopback buffers take 3.8 KB without a short write"
        );
        assert!(floor.cpu_us_per_delivery > 0.0);
    }
}

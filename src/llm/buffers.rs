//! The buffers of one upstream connection, grown to what its calls need.
//!
//! ureq's own buffers take their full size, zeroed and so resident, at a connection's first
//! call, and a worker keeps its connection: at chatpool's caps (32 KiB in, 16 KiB out) that was
//! 48 MiB for 1,024 workers, nearly all of it never touched by requests and replies of a few KB.
//! These start at [`FIRST`] and double, up to the same caps, when a read or a write fills them,
//! so a worker holds what its largest call so far needed, and a large reply or prompt still
//! goes through in reads and writes as large as before after the first few.

use ureq::unversioned::transport::Buffers;

/// What each buffer starts at: a request head and a short prompt, or a reply head and a short
/// reply, fit in one.
const FIRST: usize = 4 << 10;

/// One connection's input and output buffers (see the module's doc).
#[derive(Debug)]
pub(crate) struct GrowingBuffers {
    input: Vec<u8>,
    /// `input[consumed..filled]` is read from the socket and not yet taken by ureq.
    filled: usize,
    consumed: usize,
    input_cap: usize,
    output: Vec<u8>,
    output_cap: usize,
    /// Whether ureq's last take from the input was more than nothing (see
    /// [`Buffers::can_use_input`]).
    progress: bool,
}

impl GrowingBuffers {
    /// Empty buffers that grow to at most `input_cap` and `output_cap` bytes.
    pub(crate) fn new(input_cap: usize, output_cap: usize) -> GrowingBuffers {
        GrowingBuffers {
            input: Vec::new(),
            filled: 0,
            consumed: 0,
            input_cap: input_cap.max(1),
            output: Vec::new(),
            output_cap: output_cap.max(1),
            progress: false,
        }
    }

    /// `amount` bytes of the output went out; if that was all of it, the next write gets a
    /// larger buffer, since what is being sent did not fit.
    pub(crate) fn sent(&mut self, amount: usize) {
        if amount == self.output.len() {
            grow(&mut self.output, self.output_cap);
        }
    }

    /// Moves what is unread to the front once the read part is more than half the buffer, so
    /// the room to read into is at the end (as ureq's own buffers do).
    fn shift(&mut self) {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.consumed > 0 && self.filled > self.input.len() / 2 {
            self.input.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
    }
}

/// Doubles `buffer` (a first allocation is [`FIRST`]), never past `cap`.
fn grow(buffer: &mut Vec<u8>, cap: usize) {
    let wanted = if buffer.is_empty() {
        FIRST
    } else {
        buffer.len() * 2
    };
    buffer.resize(wanted.min(cap).max(buffer.len()), 0);
}

impl Buffers for GrowingBuffers {
    fn output(&mut self) -> &mut [u8] {
        if self.output.is_empty() {
            grow(&mut self.output, self.output_cap);
        }
        &mut self.output
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        if self.input.is_empty() {
            grow(&mut self.input, self.input_cap);
        }
        self.shift();
        &mut self.input[self.filled..]
    }

    /// A read that filled the buffer doubles it: a reply head that does not fit yet, or more
    /// of a long reply waiting in the socket.
    fn input_appended(&mut self, amount: usize) {
        self.filled = (self.filled + amount).min(self.input.len());
        if self.filled == self.input.len() {
            grow(&mut self.input, self.input_cap);
        }
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed = (self.consumed + amount).min(self.filled);
    }

    /// The scratch space is the input's free room: only a chunked request body goes through
    /// it, and chatpool sends none, but it is never empty, or such a body would end early.
    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        if self.output.is_empty() {
            grow(&mut self.output, self.output_cap);
        }
        if self.input_append_buf().is_empty() {
            let room = self.input.len() + FIRST;
            self.input.resize(room, 0);
        }
        (&mut self.input[self.filled..], &mut self.output)
    }

    fn can_use_input(&self) -> bool {
        self.filled > self.consumed && self.progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads what fits of `bytes` into the buffers, as a socket would.
    fn read_in(buffers: &mut GrowingBuffers, bytes: &[u8]) -> usize {
        let room = buffers.input_append_buf();
        let n = bytes.len().min(room.len());
        room[..n].copy_from_slice(&bytes[..n]);
        buffers.input_appended(n);
        n
    }

    #[test]
    fn nothing_is_allocated_before_the_first_call() {
        let buffers = GrowingBuffers::new(32 << 10, 16 << 10);
        assert_eq!(buffers.input.capacity() + buffers.output.capacity(), 0);
        assert!(buffers.input().is_empty());
    }

    #[test]
    fn a_short_reply_is_read_whole_into_the_first_size() {
        let mut buffers = GrowingBuffers::new(32 << 10, 16 << 10);
        let reply = vec![b'r'; 600];
        assert_eq!(read_in(&mut buffers, &reply), 600);
        assert_eq!(buffers.input(), &reply[..]);
        assert_eq!(buffers.input.len(), FIRST);
        buffers.input_consume(600);
        assert!(buffers.input().is_empty());
        assert_eq!(buffers.input_append_buf().len(), FIRST);
    }

    #[test]
    fn a_head_larger_than_the_buffer_grows_it_up_to_the_cap_and_no_further() {
        let cap = 16 << 10;
        let mut buffers = GrowingBuffers::new(cap, 16 << 10);
        // Nothing is consumed while a head is incomplete: it must fit whole.
        let head: Vec<u8> = (0..cap + 100).map(|i| i as u8).collect();
        let mut read = 0;
        while read < head.len() {
            let n = read_in(&mut buffers, &head[read..]);
            if n == 0 {
                break;
            }
            read += n;
        }
        assert_eq!(read, cap);
        assert_eq!(buffers.input.len(), cap);
        assert_eq!(buffers.input(), &head[..cap]);
        assert!(buffers.input_append_buf().is_empty());
    }

    #[test]
    fn what_is_unread_survives_the_shift_to_the_front() {
        let mut buffers = GrowingBuffers::new(32 << 10, 16 << 10);
        let bytes: Vec<u8> = (0..3000).map(|i| i as u8).collect();
        read_in(&mut buffers, &bytes);
        buffers.input_consume(2500);
        assert!(buffers.can_use_input());
        assert_eq!(buffers.input_append_buf().len(), FIRST - 500);
        assert_eq!(buffers.input(), &bytes[2500..]);
        buffers.input_consume(0);
        assert!(!buffers.can_use_input());
    }

    #[test]
    fn a_write_that_fills_the_output_doubles_it_up_to_the_cap() {
        let cap = 16 << 10;
        let mut buffers = GrowingBuffers::new(32 << 10, cap);
        assert_eq!(buffers.output().len(), FIRST);
        buffers.sent(100);
        assert_eq!(buffers.output().len(), FIRST);
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let full = buffers.output().len();
            buffers.sent(full);
            sizes.push(buffers.output().len());
        }
        assert_eq!(sizes, [2 * FIRST, cap, cap, cap]);
    }

    #[test]
    fn the_scratch_space_is_never_empty() {
        let mut buffers = GrowingBuffers::new(FIRST, FIRST);
        read_in(&mut buffers, &vec![b'x'; FIRST]);
        let (tmp, output) = buffers.tmp_and_output();
        assert!(!tmp.is_empty());
        assert_eq!(output.len(), FIRST);
        assert_eq!(buffers.input().len(), FIRST);
    }
}

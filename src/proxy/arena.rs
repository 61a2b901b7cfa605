//! Header values built per request (`X-Forwarded-For`, remaining counts, `RateLimit`) without
//! an allocation each: they are written into this thread's arena, a 16 KiB buffer that they
//! share by reference count, and the buffer is freed when the last value cut from it is dropped.
//! When fewer than [`HEADROOM`] bytes are left, the buffer is reused from its start if no value
//! cut from it is alive any more, else a new one is started.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Size of one arena buffer.
const CHUNK: usize = 16 * 1024;
/// A value is started in the current buffer only with this much room left (a longer value still
/// works: the buffer grows, at the cost of a copy).
const HEADROOM: usize = 512;

thread_local! {
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The header value that `write` puts into the arena; `None` when the bytes are not a valid
/// header value (or the thread is exiting).
pub fn value(write: impl FnOnce(&mut BytesMut)) -> Option<HeaderValue> {
    ARENA
        .try_with(|arena| {
            let mut arena = arena.borrow_mut();
            if arena.capacity() - arena.len() < HEADROOM {
                // Reuses the buffer in place once every value cut from it has been dropped (the
                // usual case: the responses they went on are written), else starts a new one.
                arena.reserve(CHUNK);
            }
            write(&mut arena);
            let bytes = arena.split().freeze();
            HeaderValue::from_maybe_shared(bytes).ok()
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_independent_slices_of_one_buffer() {
        let a = value(|b| b.extend_from_slice(b"12345")).unwrap();
        let b = value(|b| b.extend_from_slice(b"678")).unwrap();
        assert_eq!(a, "12345");
        assert_eq!(b, "678");
        // Far more than one buffer's worth, each value intact.
        let many: Vec<HeaderValue> = (0..10_000u32)
            .map(|i| value(|b| b.extend_from_slice(i.to_string().as_bytes())).unwrap())
            .collect();
        for (i, v) in many.iter().enumerate() {
            assert_eq!(v.to_str().unwrap(), i.to_string());
        }
    }

    #[test]
    fn a_value_longer_than_the_headroom_is_whole() {
        let long = "x".repeat(3 * CHUNK);
        let v = value(|b| b.extend_from_slice(long.as_bytes())).unwrap();
        assert_eq!(v.len(), long.len());
    }

    #[test]
    fn invalid_bytes_are_refused() {
        assert!(value(|b| b.extend_from_slice(b"a\nb")).is_none());
        // The arena is still usable afterwards.
        assert_eq!(value(|b| b.extend_from_slice(b"ok")).unwrap(), "ok");
    }
}

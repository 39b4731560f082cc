//! A one-shot reply slot from the (blocking) inference worker to the (async) D-Bus method that
//! queued the job: the worker fills it once, the method awaits it. Dropping the sender unfilled
//! (a worker that ended) wakes the receiver with `None`, so no caller waits forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    closed: bool,
}

pub struct Sender<T>(Arc<Mutex<Slot<T>>>);
pub struct Receiver<T>(Arc<Mutex<Slot<T>>>);

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot { value: None, waker: None, closed: false }));
    (Sender(slot.clone()), Receiver(slot))
}

fn lock<T>(m: &Mutex<Slot<T>>) -> std::sync::MutexGuard<'_, Slot<T>> {
    // A panic while holding this lock cannot leave the slot inconsistent (plain assignments).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Sender<T> {
    pub fn send(self, value: T) {
        let waker = {
            let mut s = lock(&self.0);
            s.value = Some(value);
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = lock(&self.0);
        if let Some(v) = s.value.take() {
            return Poll::Ready(Some(v));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A many-shot queue from threads (signal handler thread, directory watch, drain) to the async
/// main loop, which must never block the thread that drives the bus connection.
pub struct Mailbox<T>(Arc<Mutex<(std::collections::VecDeque<T>, Option<Waker>)>>);

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox(self.0.clone())
    }
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox(Arc::new(Mutex::new((std::collections::VecDeque::new(), None))))
    }
}

impl<T> Mailbox<T> {
    pub fn post(&self, value: T) {
        let waker = {
            let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
            q.0.push_back(value);
            q.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next item, or `Pending` (registering the waker) when the queue is empty.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<T> {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match q.0.pop_front() {
            Some(v) => Poll::Ready(v),
            None => {
                q.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Takes whatever is queued now without waiting.
    pub fn try_next(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_across_threads_and_reports_a_dropped_sender() {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(7u32);
        });
        assert_eq!(zbus::block_on(rx), Some(7));
        let (tx, rx) = channel::<u32>();
        drop(tx);
        assert_eq!(zbus::block_on(rx), None);
    }

    #[test]
    fn mailbox_wakes_an_async_reader() {
        let mb = Mailbox::default();
        let poster = mb.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            poster.post(1u8);
            poster.post(2u8);
        });
        let first = zbus::block_on(std::future::poll_fn(|cx| mb.poll_next(cx)));
        assert_eq!(first, 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(mb.try_next(), Some(2));
        assert_eq!(mb.try_next(), None);
    }
}

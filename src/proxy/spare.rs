//! Per-thread spares: what a request needs every time (a head's field list, the buffer its
//! head is written into), kept by the thread between requests so that each one does not cost
//! an allocation and a free. Each kind has its own thread-local list; these two calls are the
//! only way in and out, and both do nothing once the thread is ending.

use std::cell::RefCell;
use std::thread::LocalKey;

/// The kept ones of one kind.
pub(crate) type Spares<T> = RefCell<Vec<T>>;

/// A kept one, if the thread has one.
pub(crate) fn take<T: 'static>(spares: &'static LocalKey<Spares<T>>) -> Option<T> {
    spares
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

/// Keeps `item` for the thread's next request, unless `max` are kept already.
pub(crate) fn give<T: 'static>(spares: &'static LocalKey<Spares<T>>, item: T, max: usize) {
    let _ = spares.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < max {
                s.push(item);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static KEPT: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_given_item_comes_back_and_no_more_than_max_are_kept() {
        assert_eq!(take(&KEPT), None);
        give(&KEPT, vec![1], 2);
        give(&KEPT, vec![2], 2);
        give(&KEPT, vec![3], 2);
        assert_eq!(KEPT.with_borrow(|s| s.len()), 2);
        assert_eq!(take(&KEPT), Some(vec![2]));
        assert_eq!(take(&KEPT), Some(vec![1]));
        assert_eq!(take(&KEPT), None);
    }
}

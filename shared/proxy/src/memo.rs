//! What the stages of a pipeline read of one stream, read from the host once.
//!
//! A pipeline runs several filters on a stream, and several of them ask the host the same
//! thing: the route's name and cluster, the response's status, the time. A host call crosses
//! the VM boundary and is most of what a filter costs, so while the pipeline runs a stream's
//! stages it installs that stream's memo ([`swap`]) and these reads go through it. A filter
//! running alone has no memo installed and asks the host each time (it asks once anyway).
//!
//! Each value is what the host would answer again at that point: the route and cluster do not
//! change during a request; the response's status is read during the response headers (the
//! pipeline forgets it when new response headers come); the time is kept for one callback only
//! (the pipeline forgets it on each entry).

use std::cell::RefCell;

use keel_core::time::Instant;

/// One stream's host reads, once read.
#[derive(Clone, Debug, Default)]
pub struct Memo {
    pub(crate) route: Option<Option<String>>,
    pub(crate) cluster: Option<Option<String>>,
    pub(crate) status: Option<Option<u16>>,
    pub(crate) now: Option<Instant>,
}

impl Memo {
    /// Forgets the time: a new callback of the stream begins.
    pub fn new_callback(&mut self) {
        self.now = None;
    }
}

thread_local! {
    /// The memo of the stream whose stages run now. A VM runs one callback at a time.
    static MEMO: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// Installs `memo` for the stream whose stages are about to run (`None`: no memo) and returns
/// the one it replaces; the caller puts that back when the stages return.
pub fn swap(memo: Option<Memo>) -> Option<Memo> {
    MEMO.with(|m| m.replace(memo))
}

/// `read()`, through the installed memo's `slot` if there is one.
pub(crate) fn remembered<T: Clone>(
    slot: fn(&mut Memo) -> &mut Option<T>,
    read: impl FnOnce() -> T,
) -> T {
    MEMO.with(|m| match m.try_borrow_mut() {
        Ok(mut memo) => match memo.as_mut() {
            Some(memo) => slot(memo).get_or_insert_with(read).clone(),
            None => read(),
        },
        Err(_) => read(),
    })
}

/// Forgets the installed memo's response status: new response headers come.
pub fn forget_status() {
    MEMO.with(|m| {
        if let Ok(mut memo) = m.try_borrow_mut() {
            if let Some(memo) = memo.as_mut() {
                memo.status = None;
            }
        }
    });
}

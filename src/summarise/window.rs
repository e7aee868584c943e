//! How many LLM calls may be in flight at once.
//!
//! At most `max` (`--llm-concurrency`) while the endpoint keeps up; halved at a rate-limit
//! answer (HTTP 429) and grown back by one for every window's worth of answers, as TCP does
//! with its congestion window (additive increase, multiplicative decrease). A rate-limited
//! account then settles near the rate it is allowed, where a fixed number of calls would
//! spend every call's retries and fail neurons; a server that keeps up keeps all `max`.

use std::sync::Mutex;

use tokio::sync::{AcquireError, Semaphore, SemaphorePermit};

pub(crate) struct Window {
    slots: Semaphore,
    max: usize,
    state: Mutex<State>,
}

struct State {
    /// Calls allowed in flight now.
    size: usize,
    /// Permits to drop as calls end, to come down to `size`.
    debt: usize,
    /// Answers since `size` last changed.
    answered: usize,
    /// Moves on at each decrease: a 429 to a call sent before it does not halve again (the
    /// calls in flight when the limit was hit all tend to get one).
    epoch: u64,
}

/// A call's place in the window, held while it is in flight.
pub(crate) struct Slot<'a> {
    window: &'a Window,
    permit: Option<SemaphorePermit<'a>>,
    epoch: u64,
}

impl Window {
    pub(crate) fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            slots: Semaphore::new(max),
            max,
            state: Mutex::new(State {
                size: max,
                debt: 0,
                answered: 0,
                epoch: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every await point; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a place.
    pub(crate) async fn enter(&self) -> Result<Slot<'_>, AcquireError> {
        let permit = self.slots.acquire().await?;
        Ok(Slot {
            window: self,
            permit: Some(permit),
            epoch: self.state().epoch,
        })
    }
}

impl Slot<'_> {
    /// The call was answered: one step towards a larger window.
    pub(crate) fn answered(&self) {
        let w = self.window;
        let mut s = w.state();
        s.answered += 1;
        if s.answered >= s.size && s.size < w.max {
            s.size += 1;
            s.answered = 0;
            if s.debt > 0 {
                s.debt -= 1;
            } else {
                w.slots.add_permits(1);
            }
        }
    }

    /// The endpoint answered 429: halve the window, once per decrease. Returns the new size
    /// when this answer changed it.
    pub(crate) fn rate_limited(&self) -> Option<usize> {
        let mut s = self.window.state();
        if self.epoch != s.epoch || s.size == 1 {
            return None;
        }
        let half = s.size / 2;
        // Free places go at once; those of calls in flight as they end.
        let freed = self.window.slots.forget_permits(s.size - half);
        s.debt += s.size - half - freed;
        s.size = half;
        s.answered = 0;
        s.epoch += 1;
        Some(half)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut s = self.window.state();
        if s.debt > 0 {
            s.debt -= 1;
            if let Some(p) = self.permit.take() {
                p.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Places that can be taken at once without waiting.
    fn free(w: &Window) -> usize {
        w.slots.available_permits()
    }

    impl Window {
        fn size(&self) -> usize {
            self.state().size
        }
    }

    #[test]
    fn a_rate_limit_halves_the_window_once_and_answers_grow_it_back_to_max() {
        block_on(async {
            let w = Window::new(8);
            let slots: Vec<Slot> = futures::future::join_all((0..8).map(|_| w.enter()))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(free(&w), 0);
            // Every call in flight is refused; only the first answer counts.
            assert_eq!(slots[0].rate_limited(), Some(4));
            assert!(slots[1..].iter().all(|s| s.rate_limited().is_none()));
            assert_eq!(w.size(), 4);
            drop(slots);
            assert_eq!(free(&w), 4, "four permits forgotten as the calls ended");

            // A 429 to a call sent after the decrease halves again; free places go at once.
            let s = w.enter().await.unwrap();
            assert_eq!(s.rate_limited(), Some(2));
            assert_eq!(free(&w), 1);
            drop(s);
            assert_eq!(free(&w), 2);

            // Each window's worth of answers adds one place, up to max and no further.
            let mut answers = 0;
            while w.size() < 8 {
                let s = w.enter().await.unwrap();
                s.answered();
                answers += 1;
                assert!(answers < 100, "the window does not grow");
            }
            assert_eq!(answers, 2 + 3 + 4 + 5 + 6 + 7);
            assert_eq!(free(&w), 8);
            let s = w.enter().await.unwrap();
            for _ in 0..20 {
                s.answered();
            }
            drop(s);
            assert_eq!((w.size(), free(&w)), (8, 8));
        });
    }

    #[test]
    fn growth_while_in_debt_cancels_debt_instead_of_adding_places() {
        block_on(async {
            let w = Window::new(4);
            let mut slots = Vec::new();
            for _ in 0..4 {
                slots.push(w.enter().await.unwrap());
            }
            assert_eq!(slots[0].rate_limited(), Some(2)); // no free place: a debt of 2
            slots[0].answered();
            slots[1].answered(); // size 3: pays one of the debt
            assert_eq!(w.size(), 3);
            drop(slots); // the first to end pays the other
            assert_eq!(free(&w), 3, "places equal the window");
            // The window never goes below one place.
            let w = Window::new(1);
            let s = w.enter().await.unwrap();
            assert_eq!(s.rate_limited(), None);
            drop(s);
            assert_eq!(free(&w), 1);
        });
    }
}

//! The engine: one thread that owns the device and the loaded models and runs describe jobs
//! one at a time, as the terminal UI asks for them. Events of every job go to one channel;
//! a job can be cancelled, and a job submitted while one runs waits (only the newest waits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedSender;

use crate::activations::ActivationCache;
use crate::pipeline::{self, Event, Job, Models};
use crate::probe::ProbeSet;
use crate::store::Store;
use crate::summarise::Llm;

/// What the engine thread needs, all of it owned by the thread.
pub struct Resources {
    pub models: Models,
    pub probe: ProbeSet,
    pub store: Arc<Store>,
    pub llm: Arc<dyn Llm>,
    pub cache: Option<ActivationCache>,
    pub runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct Queue {
    next: Option<Job>,
    closed: bool,
}

pub struct Engine {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread; events of every job go to `events`, each job ending with
    /// [`Event::JobFinished`].
    pub fn start(res: Resources, events: UnboundedSender<Event>) -> Self {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let cancel = Arc::new(AtomicBool::new(false));
        let thread = {
            let queue = queue.clone();
            let cancel = cancel.clone();
            std::thread::Builder::new()
                .name("dnd-engine".into())
                .spawn(move || loop {
                    let job = {
                        let (lock, ready) = &*queue;
                        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if q.closed {
                                return;
                            }
                            if let Some(job) = q.next.take() {
                                break job;
                            }
                            q = ready.wait(q).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    cancel.store(false, Ordering::SeqCst);
                    let ctx = pipeline::Context {
                        models: &res.models,
                        probe: &res.probe,
                        store: &res.store,
                        llm: &res.llm,
                        cache: res.cache.as_ref(),
                        runtime: &res.runtime,
                        events: &events,
                        cancel: &cancel,
                    };
                    let result = pipeline::run(&ctx, &job).map_err(|e| e.to_string());
                    // Idle until the next job: the GPU memory kept for reuse goes back.
                    crate::device::release_cached_memory(&res.models.target.net.info().device);
                    if events.send(Event::JobFinished(result)).is_err() {
                        return; // nobody listens any more
                    }
                })
                .expect("the engine thread starts")
        };
        Self {
            queue,
            cancel,
            thread: Some(thread),
        }
    }

    /// Queues `job`: it runs when the current one ends, replacing any job still waiting.
    pub fn submit(&self, job: Job) {
        let (lock, ready) = &*self.queue;
        lock.lock().unwrap_or_else(|p| p.into_inner()).next = Some(job);
        ready.notify_one();
    }

    /// Stops the running job between two batches (it ends with a cancelled result) and drops
    /// the waiting one.
    pub fn cancel(&self) {
        self.queue.0.lock().unwrap_or_else(|p| p.into_inner()).next = None;
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel();
        let (lock, ready) = &*self.queue;
        lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

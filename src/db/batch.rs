//! Batching (issue 14): requests of one kind that arrive while earlier batches are in flight
//! wait for the next batch, which takes them all (up to a maximum) and serves them with one
//! transaction or one query: orders placed with one commit (`orders::place`), orders read
//! with one statement (`orders::read`). How a batch is served, and that each request still
//! gets its own outcome, is the caller's `run`; this is only the queue.
//!
//! - **No added wait.** A lone request goes at once, as a batch of one; requests are batched
//!   only when they arrive faster than batches finish. At most `in_flight` batches run at a
//!   time, so a request waits for at most that many batches ahead of it.
//! - **Deadlines.** A request already past its deadline when its batch starts is not sent
//!   (503). The batch runs under the earliest deadline of its requests; `run` is given each
//!   request's own deadline, for work it does past the first round trip (`orders::place`
//!   places some orders again, each round under the deadlines of the orders in it).
//! - **Traces.** A batch runs in a task of its own, for many requests at once, so its span
//!   (`batch`, with its database round trips under it) starts a trace of its own and links to
//!   the span of each request in it that has one (sampled): a request's span context travels
//!   with it in the queue. A batch of unsampled requests makes no span.
//!   (A span cannot have many parents; a link is OpenTelemetry's way to say "done for these".)

use std::sync::Arc;

use opentelemetry::trace::SpanContext;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{deadline, error::Error, telemetry};

/// A queue of requests of type `R` served in batches, each answered with its own `O` or error;
/// cheap to share.
pub struct Batches<R, O> {
    queue: mpsc::UnboundedSender<Waiting<R, O>>,
}

impl<R, O> Clone for Batches<R, O> {
    fn clone(&self) -> Self {
        Batches { queue: self.queue.clone() }
    }
}

struct Waiting<R, O> {
    job: Job<R>,
    answer: oneshot::Sender<Result<O, Error>>,
    /// The span of the request that submitted it (when tracing is on), for the batch's link.
    requester: Option<SpanContext>,
}

/// A request of a batch, with the deadline of the HTTP request that made it.
#[derive(Debug)]
pub struct Job<R> {
    pub request: R,
    pub deadline: Option<Instant>,
}

impl<R: Send + 'static, O: Send + 'static> Batches<R, O> {
    /// Starts serving batches of at most `max` requests, `in_flight` at a time, each with
    /// `run`, which answers every request of its batch, in order.
    pub fn start<F, Served>(max: usize, in_flight: usize, run: F) -> Batches<R, O>
    where
        F: Fn(Vec<Job<R>>) -> Served + Send + Sync + 'static,
        Served: Future<Output = Vec<Result<O, Error>>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(max.max(1), in_flight.max(1), Arc::new(run), waiting));
        Batches { queue }
    }

    /// Serves `request` in the next batch; its own outcome.
    pub async fn submit(&self, request: R) -> Result<O, Error> {
        let (answer, answered) = oneshot::channel();
        let requester = telemetry::context::current_span_context();
        let waiting = Waiting { job: Job { request, deadline: deadline::current() }, answer, requester };
        self.queue.send(waiting).map_err(|_| Error::Unavailable("the service is shutting down"))?;
        answered.await.unwrap_or_else(|_| Err(Error::Internal("the request's batch ended without an answer".into())))
    }
}

async fn batch_loop<R, O, F, Served>(
    max: usize,
    in_flight: usize,
    run: Arc<F>,
    mut waiting: mpsc::UnboundedReceiver<Waiting<R, O>>,
) where
    R: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<Job<R>>) -> Served + Send + Sync + 'static,
    Served: Future<Output = Vec<Result<O, Error>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    while let Some(first) = waiting.recv().await {
        // A slot first: while every slot is busy, arriving requests queue for this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < max {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let run = run.clone();
        tokio::spawn(async move {
            serve(batch, run.as_ref()).await;
            drop(slot);
        });
    }
}

async fn serve<R, O, F, Served>(batch: Vec<Waiting<R, O>>, run: &F)
where
    F: Fn(Vec<Job<R>>) -> Served,
    Served: Future<Output = Vec<Result<O, Error>>>,
{
    let now = Instant::now();
    let (live, late): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|waiting| waiting.job.deadline.is_none_or(|deadline| deadline > now));
    for waiting in late {
        let _ =
            waiting.answer.send(Err(Error::Unavailable("the request ran out of time waiting for its batch; retry")));
    }
    if live.is_empty() {
        return;
    }
    let earliest = live.iter().filter_map(|waiting| waiting.job.deadline).min();
    let span = batch_span(&live);
    let (requests, answers): (Vec<Job<R>>, Vec<_>) = live.into_iter().map(|w| (w.job, w.answer)).unzip();
    let count = requests.len();
    let served = run(requests).instrument(span);
    let mut outcomes = match earliest {
        Some(earliest) => deadline::scope(earliest, served).await,
        None => served.await,
    };
    if outcomes.len() != count {
        outcomes =
            (0..count).map(|_| Err(Error::Internal("a batch answered the wrong number of requests".into()))).collect();
    }
    for (answer, outcome) in answers.into_iter().zip(outcomes) {
        let _ = answer.send(outcome);
    }
}

/// The batch's span, linked to the span of each request in it; none when tracing is off (no
/// request brought a span context).
fn batch_span<R, O>(batch: &[Waiting<R, O>]) -> Span {
    if batch.iter().all(|waiting| waiting.requester.is_none()) {
        return Span::none();
    }
    let kind = std::any::type_name::<R>().rsplit("::").next().unwrap_or_default();
    // No parent, whatever span is current: a batch is no one request's child.
    let span = tracing::info_span!(parent: None, "batch", batch.of = kind, batch.size = batch.len());
    for requester in batch.iter().filter_map(|waiting| waiting.requester.clone()) {
        span.add_link(requester);
    }
    span
}

use crate::event_stream::EventStream;
use crate::permit::ProjectionPermit;
use crate::{matches, validate_query, AppendCondition, Cursor, DomainEvent, Error, Event, Query};
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

type Transition<S> = Arc<dyn Fn(&mut S, &Event) -> Result<(), Error> + Send + Sync>;

/// Folds the events matching `query` into a state of type `S`.
///
/// ```
/// use dcb_core::{fold, Query, QueryItem, StateProjector};
/// let enrolled = Query::from(QueryItem::new().types(["StudentEnrolled"]).tag("course_id", "c1"));
/// let count = StateProjector::counter(enrolled);
/// let states = fold(&count, std::iter::empty()).unwrap();
/// assert_eq!(states, 0);
///
/// // A custom projector: the sum of the `amount` field of deposits to account a1.
/// let balance = StateProjector::try_new(
///     Query::from(QueryItem::new().types(["Deposited"]).tag("account_id", "a1")),
///     0_i64,
///     |balance, event| {
///         *balance += event.data["amount"].as_i64().unwrap_or(0);
///         Ok(())
///     },
/// );
/// # let _ = balance;
/// ```
pub struct StateProjector<S> {
    /// The events this projector wants to see.
    pub query: Query,
    initial: S,
    transition: Transition<S>,
    newest_only: bool,
}

impl<S: Clone> Clone for StateProjector<S> {
    fn clone(&self) -> Self {
        Self {
            query: self.query.clone(),
            initial: self.initial.clone(),
            transition: self.transition.clone(),
            newest_only: self.newest_only,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for StateProjector<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateProjector")
            .field("query", &self.query)
            .field("initial", &self.initial)
            .field("newest_only", &self.newest_only)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + Sync + 'static> StateProjector<S> {
    /// A projector with an infallible transition.
    pub fn new(
        query: impl Into<Query>,
        initial: S,
        transition: impl Fn(&mut S, &Event) + Send + Sync + 'static,
    ) -> Self {
        Self::try_new(query, initial, move |state, event| {
            transition(state, event);
            Ok(())
        })
    }

    /// A projector whose transition can fail (for instance while deserializing a payload); a
    /// failure aborts the projection with that error.
    pub fn try_new(
        query: impl Into<Query>,
        initial: S,
        transition: impl Fn(&mut S, &Event) -> Result<(), Error> + Send + Sync + 'static,
    ) -> Self {
        Self {
            query: query.into(),
            initial,
            transition: Arc::new(transition),
            newest_only: false,
        }
    }

    /// A projector whose transition gets each matching event decoded into the typed event `E`
    /// ([`DomainEvent::decode`], upcasting included). An event that does not decode aborts the
    /// projection with [`Error::Decode`] naming it.
    ///
    /// ```ignore
    /// let enrolled = StateProjector::typed(
    ///     QueryItem::of::<StudentEnrolled>().tag("course_id", "c1"),
    ///     0_u32,
    ///     |count, _: &StudentEnrolled| *count += 1,
    /// );
    /// ```
    pub fn typed<E: DomainEvent>(
        query: impl Into<Query>,
        initial: S,
        transition: impl Fn(&mut S, &E) + Send + Sync + 'static,
    ) -> Self {
        Self::try_new(query, initial, move |state, event| {
            transition(state, &E::decode(event)?);
            Ok(())
        })
    }

    /// Like [`typed`](Self::typed), with a transition that can fail.
    pub fn try_typed<E: DomainEvent>(
        query: impl Into<Query>,
        initial: S,
        transition: impl Fn(&mut S, &E) -> Result<(), Error> + Send + Sync + 'static,
    ) -> Self {
        Self::try_new(query, initial, move |state, event| {
            transition(state, &E::decode(event)?)
        })
    }

    /// Declares that the state depends only on the newest matching event, so that projected
    /// ALONE the projector reads backwards with a limit of 1 instead of every matching event.
    /// The returned condition is the same either way: the projector's query after the newest
    /// matching event. In a set with other projectors it folds over their shared read as usual.
    ///
    /// Only correct when folding the newest event into the initial state gives the same state as
    /// folding every event in order; [`last`](StateProjector::last) and
    /// [`last_typed`](StateProjector::last_typed) are such projectors.
    pub fn newest_only(mut self) -> Self {
        self.newest_only = true;
        self
    }
}

impl StateProjector<u64> {
    /// Counts the matching events (go-crablet's `ProjectCounter`).
    pub fn counter(query: impl Into<Query>) -> Self {
        Self::new(query, 0, |count, _| *count += 1)
    }
}

impl StateProjector<bool> {
    /// Whether any matching event exists (go-crablet's `ProjectBoolean`).
    pub fn exists(query: impl Into<Query>) -> Self {
        Self::new(query, false, |seen, _| *seen = true)
    }
}

impl StateProjector<Option<Event>> {
    /// The last matching event, if any (go-crablet's `ProjectState` with a "keep last" fold).
    /// Projected alone it reads only that event, backwards with a limit of 1
    /// ([`newest_only`](StateProjector::newest_only)).
    pub fn last(query: impl Into<Query>) -> Self {
        Self::new(query, None, |last, event| *last = Some(event.clone())).newest_only()
    }
}

impl<E: DomainEvent + Clone> StateProjector<Option<E>> {
    /// The last matching event decoded into the typed event `E`, if any. Projected alone it
    /// reads only that event, backwards with a limit of 1, and its condition fails exactly when
    /// a newer matching event is appended: the shape of "the next invoice number".
    pub fn last_typed(query: impl Into<Query>) -> Self {
        Self::try_new(query, None, |last, event| {
            *last = Some(E::decode(event)?);
            Ok(())
        })
        .newest_only()
    }
}

impl<T> StateProjector<Option<T>>
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The payload of the last matching event, deserialized into `T`. Projected alone it reads
    /// only that event ([`newest_only`](StateProjector::newest_only)).
    pub fn last_data(query: impl Into<Query>) -> Self {
        Self::try_new(query, None, |last, event| {
            *last = Some(event.data_as()?);
            Ok(())
        })
        .newest_only()
    }
}

/// A set of projectors folded together: one projector, a tuple of up to eight, a `Vec` of
/// projectors of one kind, or a `BTreeMap` keyed by id for projectors built at run time.
///
/// Each event of the combined read is routed only to the projectors whose query it matches.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a projector",
    note = "a decision model's fields are projectors: a `StateProjector`, a tuple, `Vec` or `BTreeMap` of them, or another decision model"
)]
pub trait Projectors: Send + Sync {
    /// The states the fold produces, with the same shape as the projectors.
    type States: Send + 'static;

    /// How many single projectors the set holds.
    fn len(&self) -> usize;

    /// True when the set holds no projector.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queries of every projector, in order.
    fn collect_queries<'a>(&'a self, into: &mut Vec<&'a Query>);

    /// The initial states.
    fn initial(&self) -> Self::States;

    /// Feeds one event to every projector whose query it matches.
    fn apply(&self, states: &mut Self::States, event: &Event) -> Result<(), Error>;

    /// True when the states depend only on the newest event of the combined query, so a
    /// projection may read just that one, backwards with a limit of 1. False unless the set is
    /// a single projector declared [`newest_only`](StateProjector::newest_only).
    fn newest_only(&self) -> bool {
        false
    }

    /// The combined query (the OR of all projector queries, identical items once), validated.
    fn query(&self) -> Result<Query, Error> {
        let mut queries = Vec::new();
        self.collect_queries(&mut queries);
        for query in &queries {
            validate_query(query)?;
        }
        let combined = Query::union(queries);
        validate_query(&combined)?;
        Ok(combined)
    }
}

impl<S: Clone + Send + Sync + 'static> Projectors for StateProjector<S> {
    type States = S;

    fn len(&self) -> usize {
        1
    }

    fn collect_queries<'a>(&'a self, into: &mut Vec<&'a Query>) {
        into.push(&self.query);
    }

    fn initial(&self) -> S {
        self.initial.clone()
    }

    fn apply(&self, state: &mut S, event: &Event) -> Result<(), Error> {
        if matches(&self.query, &event.event_type, &event.tags) {
            (self.transition)(state, event)?;
        }
        Ok(())
    }

    fn newest_only(&self) -> bool {
        self.newest_only
    }
}

impl<P: Projectors> Projectors for Vec<P> {
    type States = Vec<P::States>;

    fn len(&self) -> usize {
        self.iter().map(Projectors::len).sum()
    }

    fn collect_queries<'a>(&'a self, into: &mut Vec<&'a Query>) {
        self.iter().for_each(|p| p.collect_queries(into));
    }

    fn initial(&self) -> Self::States {
        self.iter().map(Projectors::initial).collect()
    }

    fn apply(&self, states: &mut Self::States, event: &Event) -> Result<(), Error> {
        self.iter()
            .zip(states.iter_mut())
            .try_for_each(|(p, s)| p.apply(s, event))
    }
}

impl<P: Projectors> Projectors for BTreeMap<String, P> {
    type States = BTreeMap<String, P::States>;

    fn len(&self) -> usize {
        self.values().map(Projectors::len).sum()
    }

    fn collect_queries<'a>(&'a self, into: &mut Vec<&'a Query>) {
        self.values().for_each(|p| p.collect_queries(into));
    }

    fn initial(&self) -> Self::States {
        self.iter().map(|(k, p)| (k.clone(), p.initial())).collect()
    }

    fn apply(&self, states: &mut Self::States, event: &Event) -> Result<(), Error> {
        for (id, projector) in self {
            if let Some(state) = states.get_mut(id) {
                projector.apply(state, event)?;
            }
        }
        Ok(())
    }
}

macro_rules! tuple_projectors {
    ($($name:ident $idx:tt),+) => {
        impl<$($name: Projectors),+> Projectors for ($($name,)+) {
            type States = ($($name::States,)+);

            fn len(&self) -> usize {
                0 $(+ self.$idx.len())+
            }

            fn collect_queries<'a>(&'a self, into: &mut Vec<&'a Query>) {
                $(self.$idx.collect_queries(into);)+
            }

            fn initial(&self) -> Self::States {
                ($(self.$idx.initial(),)+)
            }

            fn apply(&self, states: &mut Self::States, event: &Event) -> Result<(), Error> {
                $(self.$idx.apply(&mut states.$idx, event)?;)+
                Ok(())
            }
        }
    };
}

tuple_projectors!(A 0);
tuple_projectors!(A 0, B 1);
tuple_projectors!(A 0, B 1, C 2);
tuple_projectors!(A 0, B 1, C 2, D 3);
tuple_projectors!(A 0, B 1, C 2, D 3, E 4);
tuple_projectors!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_projectors!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_projectors!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// Folds events into fresh states of `projectors`, routing each event by the matching rule.
pub fn fold<'a, P: Projectors>(
    projectors: &P,
    events: impl IntoIterator<Item = &'a Event>,
) -> Result<P::States, Error> {
    let mut states = projectors.initial();
    for event in events {
        projectors.apply(&mut states, event)?;
    }
    Ok(states)
}

/// The result of a projection: the states and the condition that protects a decision on them.
#[derive(Debug, Clone)]
pub struct Projection<S> {
    /// The projectors' states, shaped like the projectors.
    pub states: S,
    /// Pass this to `append_if` to append only if nothing relevant changed since the read.
    pub condition: AppendCondition,
    /// The cursor of the last event read, if any.
    pub cursor: Option<Cursor>,
    /// How many events the read returned.
    pub events_read: u64,
}

impl<S> Projection<S> {
    pub(crate) fn new(states: S, query: Query, after: Option<Cursor>, events_read: u64) -> Self {
        Self {
            states,
            condition: AppendCondition::new(query).with_after(after),
            cursor: after,
            events_read,
        }
    }
}

/// What [`project_stream`](crate::EventReaderExt::project_stream) yields.
#[derive(Debug, Clone)]
pub enum ProjectionStep<S> {
    /// Progress so far: events folded and the last cursor.
    Progress {
        /// Events folded so far.
        events_read: u64,
        /// The cursor of the last event folded.
        cursor: Cursor,
    },
    /// The finished projection; the last item of the stream.
    Done(Projection<S>),
}

pub(crate) fn fold_stream<P: Projectors + 'static>(
    projectors: P,
    query: Query,
    events: EventStream,
    progress_every: u64,
    permit: ProjectionPermit,
) -> BoxStream<'static, Result<ProjectionStep<P::States>, Error>> {
    struct State<P: Projectors> {
        projectors: P,
        states: Option<P::States>,
        query: Query,
        events: EventStream,
        count: u64,
        last: Option<Cursor>,
        every: u64,
        _permit: ProjectionPermit,
    }
    let state = State {
        states: Some(projectors.initial()),
        projectors,
        query,
        events,
        count: 0,
        last: None,
        every: progress_every.max(1),
        _permit: permit,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        st.states.as_ref()?;
        loop {
            match st.events.next().await {
                Some(Ok(event)) => {
                    let states = st.states.as_mut()?;
                    if let Err(err) = st.projectors.apply(states, &event) {
                        st.states = None;
                        return Some((Err(err), st));
                    }
                    st.count += 1;
                    st.last = Some(event.cursor);
                    if st.count % st.every == 0 {
                        let step = ProjectionStep::Progress {
                            events_read: st.count,
                            cursor: event.cursor,
                        };
                        return Some((Ok(step), st));
                    }
                }
                Some(Err(err)) => {
                    st.states = None;
                    return Some((Err(err), st));
                }
                None => {
                    let states = st.states.take()?;
                    let done = Projection::new(states, st.query.clone(), st.last, st.count);
                    return Some((Ok(ProjectionStep::Done(done)), st));
                }
            }
        }
    }))
}

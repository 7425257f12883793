//! The writing side of every store, and the session a command runs in.
use crate::reader::EventReader;
use crate::{
    AppendCommand, AppendCondition, CommandFilter, CommandRecord, CommitOutcome, Cursor, Error,
    NewCommand, NewEvent, TransactionWork,
};
use async_trait::async_trait;

/// Writing side of a store: unconditional and conditional appends, plus what the command layer
/// needs.
///
/// ```
/// # async fn demo(store: &dyn dcb_core::EventStore) -> dcb_core::Result<()> {
/// use dcb_core::{AppendCondition, EventReaderExt, NewEvent, Query, QueryItem, StateProjector};
///
/// let course = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"));
/// let decision = store.project(StateProjector::exists(course)).await?;
/// if !decision.states {
///     let event = NewEvent::builder("CourseDefined").tag("course_id", "c1").build()?;
///     store.append_if(vec![event], decision.condition).await?; // fails if c1 appeared meanwhile
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait EventStore: EventReader {
    /// Appends `events` atomically and returns the cursor of the last one.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Cursor, Error>;

    /// Appends `events` atomically unless an event matching `condition` exists after its
    /// cursor, in which case nothing is written and [`Error::Conflict`] is returned.
    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error>;

    /// Appends several commands, each with its own events and condition, in one transaction:
    /// all or nothing. Returns the cursor of each command's last event, in order.
    ///
    /// The commands take effect in order: a command's condition fails when an event matching
    /// it exists after its cursor, or when an earlier command of the batch appends one. Then
    /// nothing is written and [`Error::Conflict`] names the first failing command
    /// ([`ConflictInfo::command`](crate::ConflictInfo::command)). Invalid input is named by
    /// its command too (`commands[3].events[0]…`). All events of the batch count against
    /// `max_batch_size`.
    ///
    /// ```
    /// # async fn demo(store: &dyn dcb_core::EventStore) -> dcb_core::Result<()> {
    /// use dcb_core::{AppendCommand, AppendCondition, NewEvent, Query, QueryItem};
    ///
    /// let mut commands = Vec::new();
    /// for user in ["u1", "u2"] {
    ///     let exists = Query::from(QueryItem::new().types(["UserCreated"]).tag("user_id", user));
    ///     let event = NewEvent::builder("UserCreated").tag("user_id", user).build()?;
    ///     commands.push(AppendCommand::new(vec![event]).only_if(AppendCondition::new(exists)));
    /// }
    /// match store.append_batch(commands).await {
    ///     Ok(cursors) => assert_eq!(cursors.len(), 2),
    ///     Err(dcb_core::Error::Conflict(info)) => println!("command {:?} exists", info.command),
    ///     Err(other) => return Err(other),
    /// }
    /// # Ok(()) }
    /// ```
    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error>;

    /// Opens a session for one command: reads through it and commit its events together with
    /// the command's audit record, atomically.
    async fn command_session(&self) -> Result<Box<dyn CommandSession>, Error>;

    /// Lists recorded commands, oldest first.
    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error>;
}

/// One command's access to a store: reads, then one atomic commit of events and command record.
///
/// A session holds at most one backend connection for its whole life, so running many commands
/// at once can never exhaust a connection pool by waiting for a second connection.
#[async_trait]
pub trait CommandSession: EventReader {
    /// The command previously recorded with idempotency key `id`, if any.
    async fn find_command(&self, id: &str) -> Result<Option<CommandRecord>, Error>;

    /// Appends `events` (which may be empty) if `condition` holds and records `command`, in one
    /// transaction. With an id already recorded, writes nothing and returns
    /// [`CommitOutcome::Duplicate`].
    async fn commit(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<CommitOutcome, Error>;

    /// [`commit`](Self::commit), plus the application's own `work` in the same transaction:
    /// run after the events are inserted and the condition has held, before the commit; if it
    /// fails, nothing is written and the error is [`Error::TransactionWork`]. A duplicate or a
    /// conflict does not run it.
    ///
    /// The default runs `commit` when there is no work and refuses work with
    /// [`Error::Session`] (nothing written): only a backend with a transaction the work can
    /// use (PostgreSQL) overrides it.
    async fn commit_with(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
        work: Option<TransactionWork>,
    ) -> Result<CommitOutcome, Error> {
        match work {
            None => self.commit(command, events, condition).await,
            Some(work) => {
                crate::discard_events(events);
                Err(work.refused("this store has no database transaction for it"))
            }
        }
    }
}

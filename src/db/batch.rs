//! A transaction sent as one batch: every statement with its parameters and
//! the condition under which it runs, decided before anything is sent. On a
//! libSQL server the whole batch is one request (`remote.rs`), so no
//! transaction stays open between round trips; on a local file the same
//! steps run here, one after another, on the writer's connection. The
//! conditions are Hrana's (`ok`, `error`, `not`, `and`, `or` of earlier
//! steps), and both transports evaluate them the same way.

use libsql::Value;
pub use libsql_hrana::proto::BatchCond as Cond;

use super::{Session, Shape, Sql, StoreError};

/// One statement and its bound parameters (never values spliced into SQL).
#[derive(Clone)]
pub struct Stmt {
    pub(super) sql: Sql,
    pub(super) args: Vec<Value>,
    /// Whether its rows are wanted (queries, `RETURNING`).
    pub(super) rows: bool,
}

impl Stmt {
    /// A statement whose changes count, not its rows.
    pub fn exec(sql: &'static str, args: Vec<Value>) -> Stmt {
        Stmt { sql: Sql::Fixed(sql), args, rows: false }
    }

    /// A statement whose rows are wanted.
    pub fn query(sql: &'static str, args: Vec<Value>) -> Stmt {
        Stmt { sql: Sql::Fixed(sql), args, rows: true }
    }

    /// A query built for one use (a listing's bounds): never kept prepared.
    pub fn query_once(sql: String, args: Vec<Value>) -> Stmt {
        Stmt { sql: Sql::Once(sql.into()), args, rows: true }
    }

    /// `query` for a statement shaped for `count` rows.
    pub fn query_rows(shape: &'static Shape, count: usize, args: Vec<Value>) -> Stmt {
        Stmt { sql: Sql::Shaped(shape, count), args, rows: true }
    }

    /// `exec` for a statement shaped for `count` rows.
    pub fn exec_rows(shape: &'static Shape, count: usize, args: Vec<Value>) -> Stmt {
        Stmt { sql: Sql::Shaped(shape, count), args, rows: false }
    }
}

pub struct Step {
    pub stmt: Stmt,
    /// Runs only when this holds; `None`: always.
    pub cond: Option<Cond>,
}

/// What became of one step.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Its condition did not hold.
    Skipped,
    Done {
        rows: Vec<Vec<Value>>,
        changed: u64,
    },
    /// The statement failed; SQLite undid that statement alone, and the
    /// transaction (if one is open) goes on.
    Failed(StepError),
}

#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    /// What the failure means for the batch as a whole.
    pub class: StoreError,
}

impl Outcome {
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done { .. })
    }

    pub fn rows(&self) -> &[Vec<Value>] {
        match self {
            Outcome::Done { rows, .. } => rows,
            _ => &[],
        }
    }

    pub fn changed(&self) -> u64 {
        match self {
            Outcome::Done { changed, .. } => *changed,
            _ => 0,
        }
    }
}

/// Whether `cond` holds given the outcomes of the steps before it.
pub fn holds(cond: &Cond, outcomes: &[Outcome], autocommit: bool) -> bool {
    let at = |step: &u32| outcomes.get(*step as usize);
    match cond {
        Cond::None => true,
        Cond::Ok { step } => matches!(at(step), Some(Outcome::Done { .. })),
        Cond::Error { step } => matches!(at(step), Some(Outcome::Failed(_))),
        Cond::Not { cond } => !holds(cond, outcomes, autocommit),
        Cond::And(list) => list.conds.iter().all(|c| holds(c, outcomes, autocommit)),
        Cond::Or(list) => list.conds.iter().any(|c| holds(c, outcomes, autocommit)),
        Cond::IsAutocommit {} => autocommit,
    }
}

/// Runs `steps` on a local connection, each through its prepared statement.
/// The parameters of the steps that run are moved out, not copied.
pub(super) async fn run_local(session: &Session, steps: &mut [Step]) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(steps.len());
    for step in steps {
        if let Some(cond) = &step.cond {
            if !holds(cond, &outcomes, session.conn.is_autocommit()) {
                outcomes.push(Outcome::Skipped);
                continue;
            }
        }
        let outcome = match run_one(session, &mut step.stmt).await {
            Ok(done) => done,
            Err(err) => Outcome::Failed(StepError { message: err.to_string(), class: StoreError::from(err) }),
        };
        outcomes.push(outcome);
    }
    outcomes
}

async fn run_one(session: &Session, stmt: &mut Stmt) -> Result<Outcome, libsql::Error> {
    let statement = session.prepared.statement(&session.conn, &stmt.sql).await?;
    let args = std::mem::take(&mut stmt.args);
    let result = async {
        if !stmt.rows {
            let changed = statement.execute(args).await?;
            return Ok(Outcome::Done { rows: Vec::new(), changed: changed as u64 });
        }
        let mut rows = statement.query(args).await?;
        let columns = rows.column_count();
        let mut all = Vec::new();
        while let Some(row) = rows.next().await? {
            all.push((0..columns).map(|i| row.get_value(i)).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(Outcome::Done { rows: all, changed: 0 })
    }
    .await;
    // Reset at once: a statement left mid-step would hold its read open.
    statement.reset();
    result
}

/// A batch in the making: steps appended in order, with the step numbers
/// that later conditions refer to.
#[derive(Default)]
pub struct Steps {
    pub steps: Vec<Step>,
}

impl Steps {
    /// Appends a step; its number.
    pub fn push(&mut self, stmt: Stmt, cond: Option<Cond>) -> u32 {
        self.steps.push(Step { stmt, cond });
        (self.steps.len() - 1) as u32
    }
}

pub fn ok(step: u32) -> Cond {
    Cond::Ok { step }
}

pub fn failed(step: u32) -> Cond {
    Cond::Error { step }
}

pub fn any(conds: Vec<Cond>) -> Cond {
    if conds.len() == 1 {
        return conds.into_iter().next().expect("one condition");
    }
    Cond::Or(libsql_hrana::proto::BatchCondList { conds })
}

pub fn not(cond: Cond) -> Cond {
    Cond::Not { cond: Box::new(cond) }
}

pub fn all(conds: Vec<Cond>) -> Cond {
    if conds.len() == 1 {
        return conds.into_iter().next().expect("one condition");
    }
    Cond::And(libsql_hrana::proto::BatchCondList { conds })
}

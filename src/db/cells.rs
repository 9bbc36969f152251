//! Typed access to a row read as values (`Database::query`), with a clear
//! error when the database answers a shape the code did not ask for.

use libsql::Value;

use super::StoreError;

pub struct Cells<'a>(pub &'a [Value]);

impl Cells<'_> {
    fn at(&self, index: usize) -> Result<&Value, StoreError> {
        self.0.get(index).ok_or_else(|| StoreError::Internal(format!("the database answered no column {index}")))
    }

    fn unexpected(&self, index: usize, wanted: &str) -> StoreError {
        StoreError::Internal(format!(
            "expected {wanted} in column {index}, the database answered {:?}",
            self.0.get(index)
        ))
    }

    pub fn int(&self, index: usize) -> Result<i64, StoreError> {
        match self.at(index)? {
            Value::Integer(n) => Ok(*n),
            _ => Err(self.unexpected(index, "an integer")),
        }
    }

    pub fn text(&self, index: usize) -> Result<String, StoreError> {
        match self.at(index)? {
            Value::Text(text) => Ok(text.clone()),
            _ => Err(self.unexpected(index, "text")),
        }
    }

    pub fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        match self.at(index)? {
            Value::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    /// A BLOB's bytes (TEXT is taken as its UTF-8 bytes, as SQLite's own
    /// conversion does).
    pub fn bytes(&self, index: usize) -> Result<Vec<u8>, StoreError> {
        match self.at(index)? {
            Value::Blob(bytes) => Ok(bytes.clone()),
            Value::Text(text) => Ok(text.clone().into_bytes()),
            _ => Err(self.unexpected(index, "bytes")),
        }
    }

    pub fn is_null(&self, index: usize) -> Result<bool, StoreError> {
        Ok(matches!(self.at(index)?, Value::Null))
    }
}

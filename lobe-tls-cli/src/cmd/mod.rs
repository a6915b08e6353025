//! One module per command.

pub mod check;
pub mod issue;
pub mod list;
pub mod store;

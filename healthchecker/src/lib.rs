//! healthchecker

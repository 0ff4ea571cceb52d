//! An active/active pair of guards sharing one truth (issue 14): what one guard knows of a
//! user's sessions, the other must know before it lets that user make one more, or the pair
//! lets a user past Qlik's limit that each guard alone would have held.
//!
//! `store` is the shared part (Redis): the limit decision made atomically in the store, so
//! that concurrent logins through both guards cannot both take the last slot.

pub mod store;

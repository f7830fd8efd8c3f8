//! Rate limiting algorithms (placeholder: filled in by the limit work).

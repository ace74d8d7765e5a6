pub use retention::*;

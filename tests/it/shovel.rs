//! Dead letters for operators: shovel and dlq (filled in by the shovel work).

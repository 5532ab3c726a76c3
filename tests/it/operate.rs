//! Running hookq for real: simulate (filled in by the simulate/bench work).

//! One module per subcommand; each turns parsed arguments into a run and its printed report.

pub mod convert;
pub mod cost_report;
pub mod cuda;
pub mod distill;
pub mod eval;
pub mod eval_report;
pub mod inspect;
pub mod model;
pub mod onnx_check;
pub mod pack;
pub mod segment;
pub mod train;

//! `minisam convert`: one image, as the engine would see it, written as an RGB PNG.

use anyhow::Result;

use crate::cli::ConvertArgs;
use crate::image_io;

pub fn run(args: &ConvertArgs) -> Result<()> {
    let img = image_io::read_rgb_with(&args.input, &args.dicom.options())?;
    image_io::write_rgb(&args.output, &img)?;
    println!(
        "{} written ({}x{} RGB, as the engine sees {})",
        args.output.display(),
        img.width,
        img.height,
        args.input.display()
    );
    Ok(())
}

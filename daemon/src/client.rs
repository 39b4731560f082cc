//! The client side of `org.minisam.Segmenter1`, used by minisamctl, the tests and the bench:
//! a typed proxy plus helpers that put a frame into a sealed memfd and read the masks back.

use std::collections::HashMap;

use zbus::{proxy, OwnedFd, OwnedVariant};

use crate::service::{AdapterRow, SegmentReply, SlotReply, StreamReply, WireLayout};
use crate::prompts::{WireBox, WirePoint};

#[proxy(interface = "org.minisam.Segmenter1", default_service = "org.minisam.Segmenter1", default_path = "/org/minisam/Segmenter1")]
pub trait Segmenter1 {
    fn segment(
        &self,
        frame: OwnedFd,
        layout: &WireLayout,
        boxes: &[WireBox],
        points: &[WirePoint],
        options: HashMap<&str, OwnedVariant>,
    ) -> zbus::Result<SegmentReply>;

    fn reprompt(&self, frame_id: u64, boxes: &[WireBox], points: &[WirePoint], options: HashMap<&str, OwnedVariant>) -> zbus::Result<SegmentReply>;

    fn open_stream(&self, slots: u32, width: u32, height: u32, format: &str) -> zbus::Result<StreamReply>;

    #[allow(clippy::too_many_arguments)]
    fn segment_slot(
        &self,
        stream: u32,
        slot: u32,
        seq: u64,
        boxes: &[WireBox],
        points: &[WirePoint],
        options: HashMap<&str, OwnedVariant>,
    ) -> zbus::Result<SlotReply>;

    fn close_stream(&self, stream: u32) -> zbus::Result<()>;

    fn list_adapters(&self) -> zbus::Result<Vec<AdapterRow>>;

    fn activate_adapter(&self, name_or_modality: &str) -> zbus::Result<(String, String)>;

    fn install_adapter(&self, file: OwnedFd, activate: bool) -> zbus::Result<(String, String)>;

    fn rollback_adapter(&self) -> zbus::Result<(String, String)>;

    #[zbus(property)]
    fn active_model(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_adapter(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_use(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn frames_served(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn adapter_changed(&self, name: &str, sha256: &str) -> zbus::Result<()>;
}

/// The D-Bus error name of a failed call (`org.minisam.Segmenter1.Error.Busy`), if it is one.
pub fn error_name(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        _ => None,
    }
}

/// Options dictionary from pairs.
pub fn options<'a>(pairs: impl IntoIterator<Item = (&'a str, OwnedVariant)>) -> HashMap<&'a str, OwnedVariant> {
    pairs.into_iter().collect()
}

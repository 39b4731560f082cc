SUMMARY = "MiniSAM segmentation on the cart: daemon, client, default model"
DESCRIPTION = "Everything a cart image needs for D-Bus segmentation: minisamd with its units \
               and D-Bus policy, minisamctl for field engineers, and the bundled LiteMedSAM \
               model. Add adapter packages (minisam-adapter-<modality>) next to it."

inherit packagegroup

RDEPENDS:${PN} = "\
    minisam-model-litemedsam \
    minisamd \
    minisamd-ctl \
"

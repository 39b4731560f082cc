# minisam_adapter: package LoRA adapter files for minisamd.
#
# A recipe named minisam-adapter-<modality> puts its adapter file(s) in SRC_URI and lists their
# names in MINISAM_ADAPTER_FILES; they are installed read-only into /usr/share/minisam/adapters,
# the daemon's packaged search path (after the writable /var/lib/minisam/adapters, where
# minisamctl installs adapters in the field). See yocto/README.md for an example recipe.
#
# An adapter only loads on the base model it was trained on (minisamd compares the model's
# SHA-256 with the one in the adapter's manifest and refuses a mismatch), so the package depends
# on that model's package: set MINISAM_ADAPTER_BASE_MODEL when it is not the bundled LiteMedSAM.

MINISAM_ADAPTER_FILES ??= ""
MINISAM_ADAPTER_BASE_MODEL ??= "minisam-model-litemedsam"
MINISAM_ADAPTERS_DIR = "${datadir}/minisam/adapters"

inherit allarch

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    if [ -z "${MINISAM_ADAPTER_FILES}" ]; then
        bbfatal "${PN}: set MINISAM_ADAPTER_FILES to the adapter file name(s) from SRC_URI"
    fi
    install -d ${D}${MINISAM_ADAPTERS_DIR}
    for f in ${MINISAM_ADAPTER_FILES}; do
        install -m 0644 ${UNPACKDIR}/$f ${D}${MINISAM_ADAPTERS_DIR}/$f
    done
}

FILES:${PN} += "${MINISAM_ADAPTERS_DIR}"
RDEPENDS:${PN} = "${MINISAM_ADAPTER_BASE_MODEL}"

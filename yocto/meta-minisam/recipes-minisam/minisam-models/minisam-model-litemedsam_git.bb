SUMMARY = "LiteMedSAM packed in NF4 for minisamd (6.8 MiB)"
DESCRIPTION = "The LiteMedSAM checkpoint (MedSAM on Laptop baseline, TinyViT image encoder) \
               packed by minisam pack: linear and convolution kernels in NF4, the rest fp16, \
               one checksummed file that minisamd memory-maps. Registered as the default model \
               (/usr/share/minisam/models/default.msam)."
CVE_PRODUCT = "minisam-model-litemedsam"
SECTION = "misc"

PV = "0.1.0+git"

require recipes-minisam/minisamd/minisam-source.inc

inherit allarch update-alternatives

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d ${D}${datadir}/minisam/models ${D}${docdir}/${BPN}
    install -m 0644 ${S}/models/litemedsam-nf4.msam ${D}${datadir}/minisam/models/litemedsam-nf4.msam
    install -m 0644 ${S}/models/PROVENANCE.md ${D}${docdir}/${BPN}/PROVENANCE.md
}

# Several model packages may be installed; default.msam points at the highest priority one.
# Another model recipe registers the same alternative name with its own priority.
ALTERNATIVE:${PN} = "minisam-default-model"
ALTERNATIVE_LINK_NAME[minisam-default-model] = "${datadir}/minisam/models/default.msam"
ALTERNATIVE_TARGET[minisam-default-model] = "${datadir}/minisam/models/litemedsam-nf4.msam"
ALTERNATIVE_PRIORITY[minisam-default-model] = "50"

FILES:${PN} += "${datadir}/minisam/models"

SUMMARY = "MiniSAM segmentation daemon (D-Bus) and its client minisamctl"
SUMMARY:${PN}-ctl = "minisamctl: query minisamd and manage its adapters"
DESCRIPTION = "minisamd serves Segment Anything (SAM-family, NF4-packed) segmentation over the \
               D-Bus system bus as org.minisam.Segmenter1, frames and masks in sealed memfds, \
               with per-modality LoRA adapters, on the CPU or a CUDA GPU (Jetson iGPU included). \
               minisamctl queries the daemon and manages its adapters."
SECTION = "console/utils"
CVE_PRODUCT = "minisamd"

PV = "0.1.0+git"

require minisam-source.inc
require ${BPN}-crates.inc

SRC_URI += "file://run-ptest"

inherit cargo cargo-update-recipe-crates ptest-cargo systemd useradd features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# minisamd is one member of the workspace; cargo builds it (both binaries) from there.
CARGO_SRC_DIR = "daemon"

# The CUDA backend is always compiled in (cudarc loads libcuda and NVRTC with dlopen at run time,
# and falls back to the CPU without them); this only pulls the runtime libraries into the image.
PACKAGECONFIG ??= "${@bb.utils.filter('MACHINE_FEATURES', 'cuda', d)}"
PACKAGECONFIG[cuda] = ",,,tegra-libraries-cuda cuda-nvrtc"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/minisamd.service ${D}${systemd_system_unitdir}/minisamd.service
    install -d ${D}${datadir}/dbus-1/system.d ${D}${datadir}/dbus-1/system-services
    install -m 0644 ${S}/systemd/org.minisam.Segmenter1.conf ${D}${datadir}/dbus-1/system.d/
    install -m 0644 ${S}/systemd/org.minisam.Segmenter1.service ${D}${datadir}/dbus-1/system-services/
    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/sysusers.d/minisam.conf ${D}${nonarch_libdir}/sysusers.d/minisam.conf
    install -m 0644 ${S}/systemd/tmpfiles.d/minisam.conf ${D}${nonarch_libdir}/tmpfiles.d/minisam.conf
    install -d ${D}${sysconfdir}/default
    install -m 0644 ${S}/systemd/minisamd.default ${D}${sysconfdir}/default/minisamd
    install -d ${D}${docdir}/${BPN}
    install -m 0644 ${S}/systemd/README.md ${D}${docdir}/${BPN}/README.md
    # Search paths that model and adapter packages install into; owned here so that they exist
    # (empty) on an image with no adapter packages.
    install -d ${D}${datadir}/minisam/models ${D}${datadir}/minisam/adapters
}

PACKAGES =+ "${PN}-ctl"

FILES:${PN} += "\
    ${datadir}/dbus-1/system.d/org.minisam.Segmenter1.conf \
    ${datadir}/dbus-1/system-services/org.minisam.Segmenter1.service \
    ${nonarch_libdir}/sysusers.d/minisam.conf \
    ${nonarch_libdir}/tmpfiles.d/minisam.conf \
    ${datadir}/minisam \
"
FILES:${PN}-ctl += "${bindir}/minisamctl"
CONFFILES:${PN} = "${sysconfdir}/default/minisamd"

RDEPENDS:${PN} = "dbus"
# run-ptest starts the installed daemon on a private session bus with the installed model; the
# cargo unit and integration test binaries (ptest-cargo) run after it.
RDEPENDS:${PN}-ptest += "${PN}-ctl dbus minisam-model-litemedsam"
RDEPENDS:${PN}-ctl = "${PN}"
RRECOMMENDS:${PN} = "minisam-model-litemedsam"

# Users and groups at image build time (sysusers.d repeats them for images that run it at boot;
# it leaves existing entries alone). Pin the ids with useradd-staticids if the cart's /var
# outlives image updates.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system minisam-clients; --system minisam-admin"
USERADD_PARAM:${PN} = "--system --user-group --groups video --home-dir ${localstatedir}/lib/minisam \
                       --no-create-home --shell ${base_sbindir}/nologin \
                       --comment 'MiniSAM segmentation daemon' minisam"

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "minisamd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

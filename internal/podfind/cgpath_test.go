package podfind

import "testing"

func TestParseCgroupPath(t *testing.T) {
	const (
		uid  = "0f2a5b1c-3d4e-4f60-8a7b-9c0d1e2f3a4b"
		uidU = "0f2a5b1c_3d4e_4f60_8a7b_9c0d1e2f3a4b"
		id   = "4c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d"
		// a static (mirror) pod's uid is an md5 without dashes
		static = "8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
	)
	tests := []struct {
		path              string
		uid, cid, rt, qos string
		ok                bool
	}{
		// cgroupfs driver
		{"/kubepods/burstable/pod" + uid + "/" + id, uid, id, "", QoSBurstable, true},
		{"/kubepods/besteffort/pod" + uid + "/" + id, uid, id, "", QoSBestEffort, true},
		{"/kubepods/pod" + uid + "/" + id, uid, id, "", QoSGuaranteed, true},
		{"/kubepods/burstable/pod" + uid + "/crio-" + id, uid, id, RuntimeCRIO, QoSBurstable, true},
		{"/kubepods/pod" + static + "/" + id, static, id, "", QoSGuaranteed, true},
		// as a filesystem path in the v1 memory hierarchy, and with a nested sub-cgroup
		{"/sys/fs/cgroup/memory/kubepods/burstable/pod" + uid + "/" + id, uid, id, "", QoSBurstable, true},
		{"/kubepods/burstable/pod" + uid + "/" + id + "/sub", uid, id, "", QoSBurstable, true},
		// systemd driver
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + id + ".scope", uid, id, RuntimeContainerd, QoSBurstable, true},
		{"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-" + id + ".scope", uid, id, RuntimeCRIO, QoSBestEffort, true},
		{"/kubepods.slice/kubepods-pod" + uidU + ".slice/docker-" + id + ".scope", uid, id, RuntimeDocker, QoSGuaranteed, true},
		{"/sys/fs/cgroup/kubepods.slice/kubepods-pod" + uidU + ".slice/cri-containerd-" + id + ".scope", uid, id, RuntimeContainerd, QoSGuaranteed, true},
		// kubelet --cgroup-root=/kubelet (kind nodes)
		{"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + id + ".scope", uid, id, RuntimeContainerd, QoSBestEffort, true},
		// pod-level cgroups: uid and qos, but no container
		{"/kubepods/burstable/pod" + uid, uid, "", "", QoSBurstable, false},
		{"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice", uid, "", "", QoSBestEffort, false},
		// CRI-O's conmon is not the container
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-conmon-" + id + ".scope", uid, "", "", QoSBurstable, false},
		// not kubelet's
		{"/system.slice/containerd.service", "", "", "", "", false},
		{"/docker/" + id, "", "", "", "", false},
		{"/user.slice/pod" + uid + "/" + id, "", "", "", "", false},
		{"/kubepods/burstable/pod" + uid + "/" + id[:63], uid, "", "", QoSBurstable, false},
		{"", "", "", "", "", false},
	}
	for _, tt := range tests {
		uid, cid, rt, qos, ok := ParseCgroupPath(tt.path)
		if uid != tt.uid || cid != tt.cid || rt != tt.rt || qos != tt.qos || ok != tt.ok {
			t.Errorf("ParseCgroupPath(%q) = (%q, %q, %q, %q, %v), want (%q, %q, %q, %q, %v)",
				tt.path, uid, cid, rt, qos, ok, tt.uid, tt.cid, tt.rt, tt.qos, tt.ok)
		}
	}
}

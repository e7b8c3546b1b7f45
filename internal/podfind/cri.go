package podfind

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CRI label keys the kubelet puts on every container and sandbox.
const (
	LabelPodName       = "io.kubernetes.pod.name"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelContainerName = "io.kubernetes.container.name"
)

// CRITimeout bounds each call to a CRI socket, so a hung runtime cannot stall
// discovery.
var CRITimeout = 3 * time.Second

// CRIContainer is what a CRI runtime says about one container.
type CRIContainer struct {
	ID, SandboxID                string
	Namespace, Pod, PodUID, Name string
	Runtime                      string            // RuntimeName from the runtime's Version answer
	Annotations                  map[string]string // the sandbox's (pod's) annotations
}

// CRIInventory is the answer of one CRI runtime.
type CRIInventory struct {
	Socket            string
	RuntimeName       string // e.g. "containerd", "cri-o"
	RuntimeVersion    string
	RuntimeAPIVersion string
	Containers        map[string]CRIContainer // by container id
	Sandboxes         map[string]CRIContainer // by sandbox id; Name is ""
}

// QueryCRI asks the CRI runtime listening on the unix socket path for its
// version, pod sandboxes and containers (runtime.v1 API). Each call is bounded
// by CRITimeout.
func QueryCRI(ctx context.Context, socket string) (*CRIInventory, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, fmt.Errorf("CRI socket %s: %w (is the runtime running, and is its socket mounted into the agent?)", socket, err)
	}
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("CRI socket %s: cannot create client: %w", socket, err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)

	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, CRITimeout) }

	inv := &CRIInventory{Socket: socket, Containers: map[string]CRIContainer{}, Sandboxes: map[string]CRIContainer{}}
	c, cancel := call()
	ver, err := rt.Version(c, &runtimeapi.VersionRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("CRI runtime.v1 Version on %s failed: %w (the runtime must serve CRI v1: containerd >= 1.6 with the cri plugin enabled, or CRI-O)", socket, err)
	}
	inv.RuntimeName, inv.RuntimeVersion, inv.RuntimeAPIVersion = ver.RuntimeName, ver.RuntimeVersion, ver.RuntimeApiVersion

	c, cancel = call()
	sbs, err := rt.ListPodSandbox(c, &runtimeapi.ListPodSandboxRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("CRI ListPodSandbox on %s failed: %w (check the runtime's health, e.g. crictl --runtime-endpoint unix://%s pods)", socket, err, socket)
	}
	for _, sb := range sbs.Items {
		e := CRIContainer{ID: sb.Id, SandboxID: sb.Id, Runtime: inv.RuntimeName, Annotations: sb.Annotations}
		if md := sb.Metadata; md != nil {
			e.Namespace, e.Pod, e.PodUID = md.Namespace, md.Name, md.Uid
		}
		fillFromLabels(&e, sb.Labels)
		inv.Sandboxes[sb.Id] = e
	}

	c, cancel = call()
	cs, err := rt.ListContainers(c, &runtimeapi.ListContainersRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("CRI ListContainers on %s failed: %w (check the runtime's health, e.g. crictl --runtime-endpoint unix://%s ps)", socket, err, socket)
	}
	for _, ct := range cs.Containers {
		e := CRIContainer{ID: ct.Id, SandboxID: ct.PodSandboxId, Runtime: inv.RuntimeName}
		if md := ct.Metadata; md != nil {
			e.Name = md.Name
		}
		fillFromLabels(&e, ct.Labels)
		if sb, ok := inv.Sandboxes[ct.PodSandboxId]; ok {
			e.Annotations = sb.Annotations
			if e.Namespace == "" {
				e.Namespace = sb.Namespace
			}
			if e.Pod == "" {
				e.Pod = sb.Pod
			}
			if e.PodUID == "" {
				e.PodUID = sb.PodUID
			}
		}
		inv.Containers[ct.Id] = e
	}
	return inv, nil
}

func fillFromLabels(e *CRIContainer, l map[string]string) {
	if v := l[LabelPodName]; v != "" {
		e.Pod = v
	}
	if v := l[LabelPodNamespace]; v != "" {
		e.Namespace = v
	}
	if v := l[LabelPodUID]; v != "" {
		e.PodUID = v
	}
	if v := l[LabelContainerName]; v != "" {
		e.Name = v
	}
}

// queryAllCRI asks every configured socket that exists; sockets that are
// absent are skipped silently, sockets that exist but fail are reported.
func queryAllCRI(ctx context.Context, sockets []string) ([]*CRIInventory, error) {
	var invs []*CRIInventory
	var errs []string
	for _, s := range sockets {
		if _, err := os.Stat(s); err != nil {
			continue
		}
		inv, err := QueryCRI(ctx, s)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		invs = append(invs, inv)
	}
	if len(errs) > 0 {
		return invs, errors.New(strings.Join(errs, "; "))
	}
	return invs, nil
}

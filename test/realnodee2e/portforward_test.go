package realnodee2e

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
)

// TestPortForward: kubectl port-forward to an agnhost pod, through the API
// server, the kubelet's port 10250 and containerd's stream server, ending
// on loopback here.
func TestPortForward(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	createPod(t, ctx, agnhostPod("forward", "web", shared.Nodes[2].Name))
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	cmd := exec.CommandContext(pctx, lab.KubectlPath(shared.ToolsDir), "--kubeconfig", shared.AdminKubeconfig(),
		"-n", "forward", "port-forward", "--address", "127.0.0.1", "pod/web", ":8080")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stop(); _ = cmd.Wait() }()
	ports := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+)`)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				ports <- m[1]
				break
			}
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	var port string
	select {
	case port = <-ports:
	case <-time.After(30 * time.Second):
		t.Fatal("kubectl port-forward did not start forwarding")
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://127.0.0.1:" + port + "/hostname")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "web" {
		t.Errorf("GET /hostname through port-forward: %q, want web", b)
	}
}

package lab

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// pki is the lab's certificate authority, API server certificate, service
// account signing keys, and static tokens. Identities use tokens rather than
// client certificates because they are cheap to make and easy to read.
type pki struct {
	dir string
}

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

// identity is a user of the API server, authenticated by a static token.
type identity struct {
	name   string
	user   string
	groups []string
}

func labIdentities(nodes []Node) []identity {
	ids := []identity{
		{name: "admin", user: "lab-admin", groups: []string{"system:masters"}},
		{name: "kube-controller-manager", user: "system:kube-controller-manager"},
		{name: "kube-scheduler", user: "system:kube-scheduler"},
	}
	for _, n := range nodes {
		// The lab kubelet authenticates as the node, so the Node authorizer
		// and NodeRestriction apply to it as they would to a real kubelet.
		ids = append(ids, identity{name: "node-" + n.Name, user: "system:node:" + n.Name, groups: []string{"system:nodes"}})
	}
	return ids
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// generate writes ca.crt, apiserver.{crt,key}, sa.{key,pub}, tokens.csv and
// one kubeconfig per identity (both a loopback and an underlay variant).
func (p pki) generate(s *State) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return fmt.Errorf("creating pki dir: %w", err)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating CA key: %w", err)
	}
	now := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "sluice-lab-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("creating CA certificate: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := writePEM(p.path("ca.crt"), "CERTIFICATE", caDER, 0o644); err != nil {
		return err
	}

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating API server key: %w", err)
	}
	ips := []net.IP{net.ParseIP(s.ControlIP4), net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}
	if s.ControlIP6 != "" {
		ips = append(ips, net.ParseIP(s.ControlIP6), net.ParseIP("::1"))
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses:  ips,
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("creating API server certificate: %w", err)
	}
	if err := writePEM(p.path("apiserver.crt"), "CERTIFICATE", srvDER, 0o644); err != nil {
		return err
	}
	srvKeyDER, _ := x509.MarshalECPrivateKey(srvKey)
	if err := writePEM(p.path("apiserver.key"), "EC PRIVATE KEY", srvKeyDER, 0o600); err != nil {
		return err
	}

	// The API server's client certificate for kubelets (exec, logs,
	// port-forward): kubelets trust the lab CA.
	cliKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating kubelet client key: %w", err)
	}
	cliTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	cliDER, err := x509.CreateCertificate(rand.Reader, cliTmpl, ca, &cliKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("creating kubelet client certificate: %w", err)
	}
	if err := writePEM(p.path("kubelet-client.crt"), "CERTIFICATE", cliDER, 0o644); err != nil {
		return err
	}
	cliKeyDER, _ := x509.MarshalECPrivateKey(cliKey)
	if err := writePEM(p.path("kubelet-client.key"), "EC PRIVATE KEY", cliKeyDER, 0o600); err != nil {
		return err
	}

	// ServiceAccount tokens are signed with RSA, the algorithm every
	// Kubernetes client library accepts.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generating service account key: %w", err)
	}
	if err := writePEM(p.path("sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey), 0o600); err != nil {
		return err
	}
	saPub, _ := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err := writePEM(p.path("sa.pub"), "PUBLIC KEY", saPub, 0o644); err != nil {
		return err
	}

	var tokens strings.Builder
	for i, id := range labIdentities(s.Nodes) {
		tok := randomToken()
		fmt.Fprintf(&tokens, "%s,%s,%d,\"%s\"\n", tok, id.user, 1000+i, strings.Join(id.groups, ","))
		if err := p.writeKubeconfig(id.name+".kubeconfig", s.APIServerURL(), tok); err != nil {
			return err
		}
		if id.name == "admin" {
			if err := p.writeKubeconfig("admin-underlay.kubeconfig", s.APIServerURL(), tok); err != nil {
				return err
			}
		}
	}
	return WriteFileAtomic(p.path("tokens.csv"), []byte(tokens.String()), 0o600)
}

func randomToken() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// token returns the static token of an identity from its kubeconfig.
func (p pki) token(name string) (string, error) {
	b, err := os.ReadFile(p.path(name + ".kubeconfig"))
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if t, ok := strings.CutPrefix(strings.TrimSpace(l), "token: "); ok {
			return t, nil
		}
	}
	return "", fmt.Errorf("no token in %s", name)
}

func (p pki) writeKubeconfig(file, server, token string) error {
	return writeKubeconfig(p.path(file), server, p.path("ca.crt"), token)
}

func writeKubeconfig(path, server, caFile, token string) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: sluice-lab
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: user
  user:
    token: %s
contexts:
- name: sluice-lab
  context:
    cluster: sluice-lab
    user: user
current-context: sluice-lab
`, server, caFile, token)
	return WriteFileAtomic(path, []byte(kc), 0o600)
}

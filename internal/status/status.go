package status

import "time"

// Report is one agent's view of its node.
type Report struct {
	Node string `json:"node"`
	// Version is the agent's build (module version and VCS revision).
	Version string `json:"version,omitempty"`
	// API says whether the agent reaches the API server (apiprobe.go in
	// cmd/sluiced): while it does not, the kernel keeps its last state.
	API       *API       `json:"api,omitempty"`
	Overlay   Overlay    `json:"overlay"`
	Policy    Policy     `json:"policy"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Overlay is the overlay loop's state.
type Overlay struct {
	Ready       bool     `json:"ready"`
	Lease       []string `json:"lease"`
	LeaseSource string   `json:"leaseSource"`
	MTU         int      `json:"mtu"`
	Backend     string   `json:"backend"`
	// Implementation is the wireguard backend's: kernel or userspace.
	Implementation    string    `json:"implementation,omitempty"`
	ImplementationWhy string    `json:"implementationWhy,omitempty"`
	PublicKey         string    `json:"publicKey,omitempty"`
	Underlay          string    `json:"underlay"`
	PublicIPs         []string  `json:"publicIPs"`
	Peers             []Peer    `json:"peers"`
	LastSync          time.Time `json:"lastSync"`
	LastError         string    `json:"lastError,omitempty"`
}

// Peer is a remote node as the overlay programmed it.
type Peer struct {
	Node     string `json:"node"`
	Subnet   string `json:"subnet"`
	PublicIP string `json:"publicIP"`
	VtepMAC  string `json:"vtepMAC,omitempty"`
	// PublicKey is a wireguard peer's key, LastHandshake the latest
	// handshake with it.
	PublicKey     string     `json:"publicKey,omitempty"`
	LastHandshake *time.Time `json:"lastHandshake,omitempty"`
	// Reachable says the node answered on the underlay (ICMP-free: a
	// neighbour entry for its address that the kernel confirmed).
	Reachable bool `json:"reachable"`
	// Problem says why this node could not program the peer (no route,
	// neighbour or FDB entry to it); empty when it is programmed.
	Problem string `json:"problem,omitempty"`
}

// Policy is the policy loop's state.
type Policy struct {
	Ready     bool           `json:"ready"`
	Endpoints int            `json:"endpoints"`
	Selected  map[string]int `json:"selectedEndpointsPerPolicy"`
	LastSync  time.Time      `json:"lastSync"`
	LastError string         `json:"lastError,omitempty"`
	// NotProgrammed lists the policies that fail closed on this node,
	// with the reason.
	NotProgrammed map[string]string `json:"notProgrammed,omitempty"`
	// Hooks says what is wrong with the jumps that send pod traffic
	// through policy, when something is.
	Hooks string `json:"hooks,omitempty"`
	// Calico is the Calico API the policy loop reads ("" for none), and
	// Sources what keeps a policy source from being complete.
	Calico  string `json:"calico,omitempty"`
	Sources string `json:"sources,omitempty"`
}

// Endpoint is a local pod endpoint.
type Endpoint struct {
	Pod      string   `json:"pod"`
	HostVeth string   `json:"hostVeth"`
	IPs      []string `json:"ips"`
	Policies []string `json:"policies"`
}

// API is the agent's view of the API server.
type API struct {
	Reachable bool `json:"reachable"`
	// Since is when reachability last changed; LastContact the last
	// answer; LastError why the latest check failed, while it fails.
	Since       time.Time `json:"since"`
	LastContact time.Time `json:"lastContact"`
	LastError   string    `json:"lastError,omitempty"`
}

#Requires -Version 5.1
<#
.SYNOPSIS
  vm-healthcheck Windows agent: sends this VM's CPU, RAM, disk and uptime to the server.
.DESCRIPTION
  -Once   send one report now; exit 1 if it was not accepted.
  -Tick   one Scheduled Task cycle: replay the spool, then report (several times a minute
          when INTERVAL_SECONDS is below 60, as a task repeats at most once a minute).
  Config: %ProgramData%\vm-healthcheck\agent.conf (KEY=VALUE: SERVER_URL, AGENT_TOKEN,
  INTERVAL_SECONDS, optional VMID and NODE); an environment variable of the same name wins.
#>
[CmdletBinding()]
param(
    [switch]$Once,
    [switch]$Tick,
    [string]$ConfigPath = (Join-Path $env:ProgramData 'vm-healthcheck\agent.conf')
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$AgentVersion = '1.0.0'
$StateDir = Join-Path $env:ProgramData 'vm-healthcheck'
$SpoolDir = Join-Path $StateDir 'spool'
$SpoolMax = 100

# Windows PowerShell 5.1 may default to TLS 1.0; servers behind TLS need 1.2.
[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12

function Write-AgentLog([string]$Message) {
    Write-Host ('{0} vm-healthcheck-agent: {1}' -f (Get-Date).ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ssZ'), $Message)
}

function Read-AgentConfig {
    $config = @{ SERVER_URL = ''; AGENT_TOKEN = ''; INTERVAL_SECONDS = '30'; VMID = ''; NODE = '' }
    if (Test-Path -LiteralPath $ConfigPath) {
        foreach ($line in Get-Content -LiteralPath $ConfigPath) {
            if ($line -match '^\s*([A-Z_]+)\s*=\s*(.*?)\s*$' -and $config.ContainsKey($Matches[1])) {
                $config[$Matches[1]] = $Matches[2].Trim('"', "'")
            }
        }
    }
    foreach ($key in @($config.Keys)) {
        $fromEnv = [Environment]::GetEnvironmentVariable($key)
        if ($fromEnv) { $config[$key] = $fromEnv }
    }
    if (-not $config.SERVER_URL) { throw "SERVER_URL is not set (in $ConfigPath or the environment)" }
    if (-not $config.AGENT_TOKEN) { throw "AGENT_TOKEN is not set (in $ConfigPath or the environment)" }
    $config.SERVER_URL = $config.SERVER_URL.TrimEnd('/')
    $config.INTERVAL_SECONDS = [int]$config.INTERVAL_SECONDS
    return $config
}

function New-Report($Config) {
    $os = Get-CimInstance -ClassName Win32_OperatingSystem
    $cpu = (Get-CimInstance -ClassName Win32_Processor | Measure-Object -Property LoadPercentage -Average).Average
    $uuid = (Get-CimInstance -ClassName Win32_ComputerSystemProduct).UUID
    $disks = @(Get-CimInstance -ClassName Win32_LogicalDisk -Filter 'DriveType=3' | ForEach-Object {
            # payload:disk:begin
            [ordered]@{
                mount       = [string]$_.DeviceID
                used_bytes  = [int64]($_.Size - $_.FreeSpace)
                total_bytes = [int64]$_.Size
            }
            # payload:disk:end
        })
    # payload:begin
    $report = [ordered]@{
        hostname        = [string]$env:COMPUTERNAME
        os              = 'windows'
        machine_id      = $null
        vmid            = $null
        node            = $null
        cpu_percent     = [double][Math]::Min(100, [Math]::Max(0, [double]$cpu))
        ram_used_bytes  = [int64](($os.TotalVisibleMemorySize - $os.FreePhysicalMemory) * 1024)
        ram_total_bytes = [int64]($os.TotalVisibleMemorySize * 1024)
        disks           = $disks
        uptime_seconds  = [int64]((Get-Date) - $os.LastBootUpTime).TotalSeconds
        agent_version   = $AgentVersion
        observed_at     = (Get-Date).ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ssZ')
    }
    # payload:end
    if ($uuid -match '^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$' -and $uuid -ne 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF') {
        $report.machine_id = $uuid.ToLowerInvariant()
    } else { $report.Remove('machine_id') }
    if ($Config.VMID) { $report.vmid = [int64]$Config.VMID } else { $report.Remove('vmid') }
    if ($Config.NODE) { $report.node = [string]$Config.NODE } else { $report.Remove('node') }
    return (ConvertTo-Json -InputObject $report -Depth 4 -Compress)
}

# Returns 'ok', 'refused' (4xx but 429: never retried) or 'retry' (unreachable or failing).
function Send-Report($Config, [string]$Json) {
    $delay = 2
    for ($attempt = 1; $attempt -le 3; $attempt++) {
        $status = 0
        try {
            $null = Invoke-RestMethod -Method Post -Uri ($Config.SERVER_URL + '/api/health/report') `
                -Headers @{ Authorization = 'Bearer ' + $Config.AGENT_TOKEN } `
                -ContentType 'application/json' -Body ([Text.Encoding]::UTF8.GetBytes($Json)) -TimeoutSec 15 -UseBasicParsing
            return 'ok'
        } catch [System.Net.WebException] {
            if ($_.Exception.Response) { $status = [int]$_.Exception.Response.StatusCode }
        }
        if ($status -eq 401 -or $status -eq 403) {
            Write-AgentLog "the server rejected the agent token (HTTP $status): check AGENT_TOKEN in $ConfigPath"
            return 'refused'
        }
        if ($status -ge 400 -and $status -lt 500 -and $status -ne 429) {
            Write-AgentLog "report refused (HTTP $status)"
            return 'refused'
        }
        if ($attempt -lt 3) { Start-Sleep -Seconds $delay; $delay *= 2 }
    }
    if ($status -eq 0) { Write-AgentLog "server $($Config.SERVER_URL) unreachable" } else { Write-AgentLog "server answered HTTP $status" }
    return 'retry'
}

function Save-ToSpool([string]$Json) {
    New-Item -ItemType Directory -Force -Path $SpoolDir | Out-Null
    $name = '{0:D20}-{1}.json' -f [DateTime]::UtcNow.Ticks, $PID
    [IO.File]::WriteAllText((Join-Path $SpoolDir $name), $Json)
    $files = @(Get-ChildItem -LiteralPath $SpoolDir -Filter '*.json' | Sort-Object Name)
    if ($files.Count -gt $SpoolMax) {
        $files | Select-Object -First ($files.Count - $SpoolMax) | Remove-Item -Force
    }
}

# Sends spooled reports oldest first; $false when one could not be delivered yet.
function Send-Spool($Config) {
    if (-not (Test-Path -LiteralPath $SpoolDir)) { return $true }
    foreach ($file in @(Get-ChildItem -LiteralPath $SpoolDir -Filter '*.json' | Sort-Object Name)) {
        $result = Send-Report $Config ([IO.File]::ReadAllText($file.FullName))
        if ($result -eq 'retry') { return $false }
        Remove-Item -LiteralPath $file.FullName -Force
    }
    return $true
}

function Invoke-Cycle($Config) {
    $json = New-Report $Config
    if (Send-Spool $Config) {
        $result = Send-Report $Config $json
    } else {
        $result = 'retry'
    }
    if ($result -eq 'retry') { Save-ToSpool $json }
    return $result
}

try {
    $config = Read-AgentConfig
    if ($Once) {
        $result = Invoke-Cycle $config
        if ($result -ne 'ok') { Write-AgentLog "report not accepted by $($config.SERVER_URL)"; exit 1 }
        Write-AgentLog "report accepted by $($config.SERVER_URL)"
        exit 0
    }
    $runs = 1
    if ($Tick -and $config.INTERVAL_SECONDS -lt 60) { $runs = [Math]::Floor(60 / $config.INTERVAL_SECONDS) }
    for ($i = 1; $i -le $runs; $i++) {
        $null = Invoke-Cycle $config
        if ($i -lt $runs) { Start-Sleep -Seconds $config.INTERVAL_SECONDS }
    }
} catch {
    Write-AgentLog ('error: ' + $_.Exception.Message)
    exit 1
}
